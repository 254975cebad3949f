"""Data for cola: tokenizers (data.tokenizer), datasets (data/prepare.py), batches (data.loader)."""
