"""The one rule for a path that data names: its real path must lie inside the data root.

Image files, frame folders and clips named by a LLaVA JSON, a question file, a streamed record or
a direct ``load_image(path, root=...)`` call all go through ``resolve_under``. A path may be
relative to the root or absolute; either way its real path (``..`` collapsed, symlinks followed)
must stay inside the root, so ``../x``, ``/etc/passwd`` and a link leading out are refused alike,
and always as a ``SampleError`` (the sample names a file it may not read).
"""

from __future__ import annotations

import os
from pathlib import Path

from ...errors import SampleError


def resolve_under(path: str | os.PathLike, root: str | Path | None, *, where: str = "") -> str:
    """The real path to open for ``path`` under ``root`` (``path`` as given when ``root`` is None).

    ``where``: what names the sample in the error, e.g. ``"data.json: sample 3 (id a)"``.
    """
    name = os.fspath(path)
    if root is None:
        return name
    root_real = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root_real, name))  # join keeps an absolute ``name`` as is
    if os.path.commonpath([real, root_real]) != root_real:
        prefix = f"{where}: " if where else ""
        raise SampleError(f"{prefix}image path '{name}' escapes the data root {root}")
    return real
