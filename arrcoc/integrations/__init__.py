"""arrcoc inside other libraries' models: Hugging Face VLMs, graphed decoding, token positions."""
