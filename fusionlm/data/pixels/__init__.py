"""Pixels: from a path named by the data to encoder inputs (the path rule, decoding, tiling, clips, ImageSpec)."""
