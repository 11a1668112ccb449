"""Running tensors-in, tensors-out callables fast: CUDA graphs and side streams. Nothing here knows relevance."""
