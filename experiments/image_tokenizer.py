"""The visual vocabulary at the recipes' scale: train the ``vq`` image tokenizer on world pictures
and measure what issue 14 asks of it, next to the exact ``palette`` tokenizer.

For each tokenizer: reconstruction PSNR on held-out GenEval reference pictures, the share of the
codebook those pictures use, the perplexity of their codes, the dead codes, the *ceiling*:
GenEval of the reconstructed pictures (what a generator that wrote the right codes would score),
and FD (``fusionlm.evaluate.fd``) of the reconstructions against a second draw of the same prompts,
next to the FD of the references themselves (the floor).

    python experiments/image_tokenizer.py --steps 1500 --out runs/image_tokenizer
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter
from pathlib import Path

import torch

from fusionlm.config import ImageTokenizerConfig
from fusionlm.data.world.render import render_image
from fusionlm.data.world.scenes import draw_scene, geneval_scenes, training_scene
from fusionlm.evaluate.fd import frechet_distance
from fusionlm.evaluate.geneval import check, geneval
from fusionlm.image_tokenizers import build_image_tokenizer, psnr, images_of, pixels_of, usage


def pictures(rng: random.Random, n: int, size: int):
    scenes = [training_scene(rng) for _ in range(n)]
    return pixels_of([render_image(draw_scene(s, rng, size)) for s in scenes], size)


def _kind(clause: str) -> str:
    """A failed clause by kind: what went wrong, not which prompt."""
    for words, kind in (("not a world shape", "unrecognised object"), ("more than", "extra object"),
                        ("found", "missing or wrong object"), (" is not ", "relation")):
        if words in clause:
            return kind
    return clause


def measure(tok, size: int, per_category: int) -> dict:
    rng = random.Random("reference")
    scenes = geneval_scenes(per_category)
    originals = pixels_of([render_image(draw_scene(s, rng, size)) for s in scenes], size)
    tok.eval()
    with torch.no_grad():
        codes = tok.encode(originals)
        out = tok.decode(codes)
    scores = geneval(scenes, images_of(out))
    failures = Counter(_kind(f) for s, im in zip(scenes, images_of(out)) for f in check(s, im).failed)
    other = [render_image(draw_scene(s, random.Random(f"other/{i}"), size)) for i, s in enumerate(scenes)]
    return {"psnr_db": round(psnr(out, originals), 2),
            "fd": round(frechet_distance(other, images_of(out)), 3),
            "fd_of_references": round(frechet_distance(other, images_of(originals)), 3), **{k: round(v, 3) for k, v in usage(codes, tok.codebook_size).items()},
            "geneval_ceiling": {k: round(v, 3) for k, v in scores.items()},
            "failed_clauses": dict(failures.most_common(8)), "reference_geneval": geneval(scenes, images_of(originals))["overall"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--codebook", type=int, default=512)
    ap.add_argument("--downsample", type=int, default=4, help="pixels per code along a side (vq)")
    ap.add_argument("--channels", type=int, default=64, help="the vq encoder's and decoder's width")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--per-category", type=int, default=50)
    ap.add_argument("--out", default="runs/image_tokenizer")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for down in (1, 2, 4):
        tok = build_image_tokenizer(ImageTokenizerConfig(kind="palette", image_size=args.size, downsample=down,
                                                         codebook_size=7))
        results[f"palette/{down}"] = measure(tok, args.size, args.per_category)
        print(f"palette/{down}", results[f"palette/{down}"], flush=True)
    tok = build_image_tokenizer(ImageTokenizerConfig(image_size=args.size, codebook_size=args.codebook,
                                                     downsample=args.downsample, channels=args.channels))
    opt = torch.optim.AdamW(tok.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)  # linear warm-up, then cosine to zero
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    rng, start, log = random.Random("train"), time.time(), []
    for step in range(args.steps):
        tok.train()
        batch = pictures(rng, args.batch, args.size)
        rec = tok(batch)
        opt.zero_grad(set_to_none=True)
        rec.loss.backward()
        torch.nn.utils.clip_grad_norm_(tok.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            line = {"step": step, "loss": round(rec.loss.item(), 5), "psnr_db": round(psnr(rec.pixels, batch), 2),
                    **{k: round(v, 3) for k, v in usage(rec.codes, tok.codebook_size).items()},
                    "seconds": round(time.time() - start, 1)}
            log.append(line)
            print(line, flush=True)
    results["vq"] = {**measure(tok, args.size, args.per_category), "steps": args.steps,
                     "train_seconds": round(time.time() - start, 1), "codebook_size": args.codebook,
                     "downsample": args.downsample, "channels": args.channels}
    print("vq", results["vq"])
    torch.save({"config": vars(tok.config), "state_dict": tok.state_dict()}, out / "vq.pt")
    (out / "results.json").write_text(json.dumps({"results": results, "log": log}, indent=1))
    originals = pixels_of([render_image(draw_scene(s, random.Random(i), args.size))
                           for i, s in enumerate(geneval_scenes(2))], args.size)  # (12, 3, S, S)
    with torch.no_grad():
        rows = torch.cat([originals, tok.decode(tok.encode(originals))], dim=2)  # (12, 3, 2S, S)
    grid = torch.cat(list(rows), dim=2)  # (3, 2S, 12 S): originals above, reconstructions below
    images_of(grid[None])[0].resize((grid.shape[2] * 4, grid.shape[1] * 4), 0).save(out / "reconstructions.png")
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
