"""Data for cola: tokenizers (data.tokenizer), datasets (data/prepare.py, tokenizing with data.encode),
batches (data.loader), benchmark items (data/benchmarks.py), text statistics (data.quality)."""
