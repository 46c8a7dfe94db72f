"""The chunked linear + cross-entropy (``fusionlm.linear_ce``) against the reference
``F.cross_entropy(F.linear(h, W).float(), t)``: one forward + backward of N = 4,096 rows of width
576 (SmolLM-135M's) through a head of 400 and of 49,152 (SmolLM's vocabulary) classes, fp32, both
timed in turn (medians of 5 rounds after a warm-up). Memory: the largest intermediate, analytic
(the (N, V) fp32 logits for the reference, a chunk's for ours), and the peak RSS growth of one step
measured in a fresh process for each side (``child_rss``; the (V, D) weight gradient and the (N, D)
hidden one, which both make, are in both). ``--sweep`` adds a table of chunk sizes at V = 49,152.

    python benchmarks/linear_ce.py [--sweep]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F

from common import machine, print_table, timed_alternately
from fusionlm.linear_ce import default_chunk_rows, linear_cross_entropy

N, D = 4096, 576
VOCABS = (400, 49_152)


def setup(vocab: int):
    torch.manual_seed(0)
    hidden = torch.randn(N, D).requires_grad_()  # (N, D)
    weight = (torch.randn(vocab, D) / D**0.5).requires_grad_()  # (V, D)
    targets = torch.randint(0, vocab, (N,))  # (N,)
    return hidden, weight, targets


def step(side: str, hidden, weight, targets, chunk_rows: int | None = None):
    def run():
        hidden.grad = weight.grad = None
        if side == "reference":
            loss = F.cross_entropy(F.linear(hidden, weight).float(), targets)
        else:
            loss = linear_cross_entropy(hidden, weight, None, targets, chunk_rows=chunk_rows)
        loss.backward()
        return loss.detach()
    return run


def rss_growth(side: str, vocab: int) -> float:
    """MB by which one step raises the peak RSS of a fresh process that holds the inputs."""
    out = subprocess.run([sys.executable, __file__, "--rss", side, str(vocab)], check=True,
                         capture_output=True, text=True).stdout
    return float(out.split()[-1])


def status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def child_rss(side: str, vocab: int) -> None:
    """Prints the MB by which one step raises this process's peak RSS. Linux: the peak (VmHWM) is
    reset to the current RSS just before the step (``/proc/self/clear_refs``), since ``ru_maxrss``
    survives fork + exec and would start at the parent's peak; elsewhere ``ru_maxrss``."""
    torch.set_num_threads(2)
    small = (torch.randn(8, D).requires_grad_(), torch.randn(16, D).requires_grad_(), torch.randint(0, 16, (8,)))
    step(side, *small)()  # the kernels' lazy set-up, outside the measurement
    tensors = setup(vocab)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        reset = status_kib("VmHWM") is not None
    except OSError:
        reset = False
    if reset:
        before, peak = status_kib("VmRSS"), lambda: status_kib("VmHWM")
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    step(side, *tensors)()
    print((peak() - before) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rss", nargs=2, metavar=("SIDE", "VOCAB"), help=argparse.SUPPRESS)
    parser.add_argument("--sweep", action="store_true", help="also time chunk sizes at V = 49,152")
    args = parser.parse_args()
    if args.rss:
        return child_rss(args.rss[0], int(args.rss[1]))
    torch.set_num_threads(2)
    rows = []
    for vocab in VOCABS:
        tensors = setup(vocab)
        ref, ours = step("reference", *tensors), step("chunked", *tensors)
        ref_loss, ref_grads = ref(), [tensors[0].grad.clone(), tensors[1].grad.clone()]
        our_loss, our_grads = ours(), [tensors[0].grad, tensors[1].grad]
        loss_diff = abs(float(ref_loss) - float(our_loss))
        grad_diff = max(float((a - b).abs().max()) for a, b in zip(ref_grads, our_grads))
        del ref_grads, our_grads
        t_ref, t_ours = timed_alternately(ref, ours, repeats=5, warmup=1)
        chunk = min(default_chunk_rows(vocab), N)
        rss_ref, rss_ours = rss_growth("reference", vocab), rss_growth("chunked", vocab)
        rows.append(f"| {vocab:,} | {chunk} | {t_ref * 1e3:.0f} | {t_ours * 1e3:.0f} | **{t_ours / t_ref:.2f}×** | "
                    f"{N * vocab * 4 / 1e6:.1f} | {chunk * vocab * 4 / 1e6:.1f} | {rss_ref:.0f} | {rss_ours:.0f} | "
                    f"{loss_diff:.1e} | {grad_diff:.1e} |")
    print(f"machine: {machine()}; N = {N} rows, D = {D}, fp32, no bias; one forward + backward, "
          "medians of 5 in turn after a warm-up; chunk: rows per chunk (default_chunk_rows, at most N)")
    print_table(["V", "chunk", "reference ms", "chunked ms", "chunked / reference", "largest intermediate, "
                 "reference MB", "largest intermediate, chunked MB", "peak RSS growth, reference MB",
                 "peak RSS growth, chunked MB", "|loss difference|", "max |grad difference|"],
                "rrrrrrrrrrr", rows)
    if args.sweep:
        vocab = VOCABS[-1]
        tensors = setup(vocab)
        sizes = (42, 85, 170, 341, 682)
        times = timed_alternately(*[step("chunked", *tensors, chunk_rows=c) for c in sizes], repeats=3, warmup=1)
        print(f"\nchunk sizes at V = {vocab:,} (medians of 3 in turn)")
        print_table(["chunk rows", "chunk logits MB", "ms"], "rrr",
                    [f"| {c} | {c * vocab * 4 / 1e6:.0f} | {t * 1e3:.0f} |" for c, t in zip(sizes, times)])


if __name__ == "__main__":
    main()
