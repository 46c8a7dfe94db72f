"""A grid of pictures a drawing checkpoint makes: held-out GenEval prompts (rows) x seeds (columns),
each picture beside nothing but its prompt's category, scaled up for reading.

    python experiments/draw_grid.py --checkpoint runs/janus --out docs/generation/janus_grid.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from fusionlm.checkpoint import load_model
from fusionlm.data.world.scenes import geneval_scenes
from fusionlm.draw import DrawRequest, Sampling, draw
from fusionlm.evaluate.geneval import check


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--scale", type=int, default=3)
    ap.add_argument("--cfg", type=float, help="guidance scale (default: the checkpoint's model.generation.cfg)")
    args = ap.parse_args()
    model, tokenizer, config = load_model(args.checkpoint)
    sampling = Sampling.of(config.model.generation, cfg=args.cfg)
    scenes = geneval_scenes(args.per_category, seed=1)
    side = model.image_tokenizer.config.image_size * args.scale
    label = 230
    grid = Image.new("RGB", (label + args.seeds * (side + 4), len(scenes) * (side + 4)), "white")
    pen = ImageDraw.Draw(grid)
    for row, scene in enumerate(scenes):
        pictures = draw(model, tokenizer, [DrawRequest(scene.prompt, seed=s) for s in range(args.seeds)],
                        sampling=sampling)
        y = row * (side + 4)
        pen.text((4, y + side // 2 - 6), f"{scene.prompt}", fill="black")
        for col, picture in enumerate(pictures):
            x = label + col * (side + 4)
            grid.paste(picture.resize((side, side), Image.NEAREST), (x, y))
            ok = check(scene, picture).ok
            pen.rectangle([x, y, x + side - 1, y + side - 1], outline="green" if ok else "red", width=2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out}: {len(scenes)} prompts x {args.seeds} seeds (green: GenEval passes it)")


if __name__ == "__main__":
    main()
