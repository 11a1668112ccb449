"""Evaluation, benchmarks, fuzzing and pictures: programs built on the library, never imported by it."""
