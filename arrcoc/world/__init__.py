"""The generated VQA world: scenes with known answers, the small VLM that reads them, and its training."""
