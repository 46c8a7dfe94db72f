"""When compiled decoder layers pay: the demo's ``instruct`` stage trained eager, compiled with an
empty compile cache, and compiled with the cache the empty run filled; the break-even stage length
behind ``fusionlm.train.compiled.COMPILE_FROM``.

    python benchmarks/compile_pays.py [--steps 300] [--rounds 2]

Each arm is fusionlm's own loop (``benchmarks/train_end_to_end.py``'s fusionlm arm: the same
model, data and defaults) in a fresh process, timed in turn (eager, empty cache, warm cache; then
again). ``train.compile`` is set to false / true; the empty cache is a new ``TORCHINDUCTOR_CACHE_DIR``
each round, the warm run reuses it. Printed per arm: wall seconds to the end of training and the
median micro-batch after the 20th (the steady speed); then, for each compiled arm, its saving per
micro-batch and the stage length from which it is faster end to end,
``steps + (compiled wall - eager wall) / (eager micro-batch - compiled micro-batch)``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from common import machine

ARMS = ("eager", "empty cache", "warm cache")


def variant(root: Path, compile_: bool) -> Path:
    """A run folder whose recipe is ``root``'s with ``train.compile`` set."""
    out = root / ("compiled" if compile_ else "eager")
    out.mkdir(exist_ok=True)
    recipe = yaml.safe_load((root / "recipe.yaml").read_text())
    recipe["train"]["compile"] = compile_
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return out


def arm(run: Path, cache: Path | None) -> dict:
    env = dict(os.environ)
    if cache is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    out = run / "result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--arm", str(run), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"arm {run.name} failed ({done.returncode})")
    result = json.loads(out.read_text())
    steps = result["steps_s"]
    return {"wall": result["wall_s"], "step": statistics.median(steps[20:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--arm", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import train_end_to_end as e2e

    if args.arm:
        args.out.write_text(json.dumps(e2e.run_fusionlm(args.arm)))
        return
    root = Path(tempfile.mkdtemp(prefix="compile-pays-"))
    try:
        print(e2e.setup("demo", args.steps, root))
        eager, compiled = variant(root, False), variant(root, True)
        times = {a: [] for a in ARMS}
        for r in range(args.rounds):
            cache = root / f"cache{r}"
            times["eager"].append(arm(eager, None))
            times["empty cache"].append(arm(compiled, cache))
            times["warm cache"].append(arm(compiled, cache))
        print(f"{machine()}; demo instruct stage, {args.steps} steps of 32 samples, {args.rounds} rounds")
        med = {a: {k: statistics.median(t[k] for t in times[a]) for k in ("wall", "step")} for a in ARMS}
        for a in ARMS:
            walls = [t["wall"] for t in times[a]]
            print(f"{a:12s} wall {med[a]['wall']:6.1f} s ({min(walls):.1f}-{max(walls):.1f})  "
                  f"micro-batch {1000 * med[a]['step']:5.1f} ms")
        for a in ("empty cache", "warm cache"):
            saving = med["eager"]["step"] - med[a]["step"]
            extra = med[a]["wall"] - med["eager"]["wall"]
            even = args.steps + extra / saving if saving > 0 else float("inf")
            print(f"{a}: {1000 * saving:.1f} ms ({saving / med['eager']['step']:.0%}) saved per micro-batch, "
                  f"{extra:.1f} s more at {args.steps}; compiling pays from about {even:,.0f} micro-batches")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
