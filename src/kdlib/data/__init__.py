"""Data: reading rows, chat formats, tokenisation with loss spans, samples and batches."""
