"""Fixtures for models: the tiny random-weight Gemma and its tokenizer."""
