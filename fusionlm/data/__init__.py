"""Data: the one image loader, the synthetic world, file formats, tokenization and batching."""
