"""Where samples come from: the synthetic world, files read whole (LLaVA JSON, question JSONL),
streamed formats (WebDataset shards, parquet, JSON lines, ``save_to_disk`` folders) and several
named sources mixed by weight, all opened through ``open``."""

from .files import FileSource, WorldSource
from .mix import MultiSource
from .open import build_source, detect_format, open_source

__all__ = ["FileSource", "MultiSource", "WorldSource", "build_source", "detect_format", "open_source"]
