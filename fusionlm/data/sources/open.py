"""The one opener: a path (or ``synthetic``) and a format in, a source of samples out.

``detect_format`` tells a path's format from its name (a folder from what it holds, a ``.jsonl``
file from its first record); ``open_source`` builds the reader for it; ``build_source`` does the
same for a recipe's ``data`` section, a single ``data.source`` or several named ``data.sources``
mixed by weight (``mix.MultiSource``). Every entry point (training, evaluation, ``fusionlm data
check``, ``fusionlm info``) opens data through here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ...config import SOURCE_FORMATS, DataConfig
from ...errors import ConfigError
from .files import FileSource, WorldSource
from .mix import MultiSource
from .streams import ArrowFolder, JsonLines, ParquetRows, TarShards

STREAMS = {"webdataset": TarShards, "parquet": ParquetRows, "jsonl": JsonLines, "hf": ArrowFolder}


def detect_format(path: str | Path) -> str:
    """The format of ``path`` from its name (and a ``.jsonl`` file's first record)."""
    p = Path(path)
    if p.is_dir():
        if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
            return "hf"
        names = [f.name.lower() for f in p.iterdir()]
        for fmt, suffix in (("webdataset", ".tar"), ("parquet", ".parquet"), ("jsonl", ".jsonl")):
            if any(n.endswith(suffix) for n in names):
                return fmt
        raise ConfigError(f"{path}: no .tar, .parquet or .jsonl files and no save_to_disk state.json in this folder")
    suffix = p.suffix.lower()
    if suffix in (".tar", ".parquet"):
        return {".tar": "webdataset", ".parquet": "parquet"}[suffix]
    if suffix == ".jsonl":
        with open(p, "rb") as f:
            first = next((line for line in f if line.strip()), b"{}")
        try:
            return "qa" if "question" in json.loads(first) else "jsonl"
        except (ValueError, TypeError):
            return "jsonl"  # the bad line is reported when it is read
    return "llava"


def open_source(path: str, fmt: str = "auto", *, image_root: str | None = None, task: str | None = None,
                world_image_size: int = 64, world_seed: int = 0):
    """A source of samples for ``path`` in format ``fmt`` (one of ``SOURCE_FORMATS``)."""
    if fmt == "synthetic":
        return WorldSource(world_image_size, world_seed)
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such file or folder")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt in ("llava", "qa"):
        return FileSource(path, image_root, fmt=fmt)
    if fmt not in STREAMS:
        raise ConfigError(f"format {fmt!r} is not one of {', '.join(SOURCE_FORMATS)}")
    return STREAMS[fmt](path, task) if task else STREAMS[fmt](path)


def build_source(config: DataConfig, path: str | None = None):
    """The data of a run (``path`` overrides ``config.source``, e.g. an eval file)."""
    world = dict(world_image_size=config.world_image_size, world_seed=config.world_seed)
    if config.sources and path is None:  # named sources mixed by the stage mixture
        return MultiSource({name: open_source(spec.path, spec.format, image_root=spec.image_root, task=spec.task,
                                              **world)
                            for name, spec in config.sources.items()})
    source = path or config.source
    if source == "synthetic":
        return open_source(source, "synthetic", **world)
    if not os.path.exists(source):
        raise ConfigError(f"data.source: {source!r} is neither 'synthetic' nor an existing file or folder")
    return open_source(source, image_root=config.image_root)
