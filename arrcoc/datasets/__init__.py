"""Compressing whole data sets: sources, sharded outputs, atomic writes."""
