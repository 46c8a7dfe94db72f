"""Dynamic tiling (NVLM, InternVL; LLaVA-NeXT's AnyRes in spirit): which grid of encoder-sized
tiles an image is cut into, and the cutting itself.

The grid is chosen from the image's aspect ratio: among all (rows, cols) with ``min_tiles`` to
``max_tiles`` tiles, the one whose cols/rows is closest to width/height; of grids equally close,
the larger one when the image has at least half the pixels to fill it (else the smaller one), so
a small image is not blown up into many tiles.
"""

from __future__ import annotations

from PIL import Image


def tile_grid(width: int, height: int, *, max_tiles: int, min_tiles: int = 1, tile: int) -> tuple[int, int]:
    """(rows, cols) of tiles for a ``width`` × ``height`` image."""
    aspect = width / height
    candidates = sorted(
        {(r, c) for n in range(min_tiles, max_tiles + 1) for r in range(1, n + 1) for c in range(1, n + 1)
         if min_tiles <= r * c <= max_tiles},
        key=lambda g: (g[0] * g[1], g),
    )
    best, best_diff = (1, 1), float("inf")
    for rows, cols in candidates:
        diff = abs(aspect - cols / rows)
        if diff < best_diff - 1e-9:
            best, best_diff = (rows, cols), diff
        elif abs(diff - best_diff) <= 1e-9 and width * height > 0.5 * tile * tile * rows * cols:
            best = (rows, cols)  # as close in shape, and the image has the pixels for more tiles
    return best


def cut_tiles(img: Image.Image, grid: tuple[int, int], tile: int) -> list[Image.Image]:
    """Resize ``img`` to exactly ``grid`` tiles of ``tile`` pixels and cut them out, row-major."""
    rows, cols = grid
    resized = img.resize((cols * tile, rows * tile), resample=Image.Resampling.BICUBIC)
    return [resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
            for r in range(rows) for c in range(cols)]
