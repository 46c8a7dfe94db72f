"""`fusionlm compare`: train several recipes on the same data and budget, evaluate each the same
way, and report what each design scores and what it costs.

For every recipe: train (a step budget shared among its stages in proportion to their steps, or
a wall-clock budget shared the same way), then score it zero- and k-shot on the tasks it trained
on, and measure training tokens/s, decoder length and image tokens per sample, FLOPs per sample
(``fusionlm info``), generation latency, and the LLM's text-only loss before and after
multimodal training (before = the end of a text-only stage that stands in for LLM
pre-training, when the recipe has one). ``OUT/report.md`` holds the tables, ``OUT/*.png`` the
plots, ``OUT/results.json`` everything.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import build_model, list_checkpoints, load_checkpoint_weights, load_model
from .config import RecipeConfig, load_recipe
from .data.batching.batches import collate
from .data.chat import SkipSample
from .data.prompt import PromptEncoder
from .data.pixels.processing import ImageBatch, ImageSpec
from .data.sources import build_source
from .data.world.scenes import CATEGORIES, geneval_scenes
from .draw import DrawRequest, Sampling, draw, passes
from .evaluate.harness import EVAL_TASKS, evaluate
from .evaluate.tasks import EvalTask
from .generate import Request
from .info import report
from .recipe import trained_tasks
from .train.loop import train
from .train.report import read_metrics

TEXT_DOCS = 32  # text-only documents the LLM's text loss is measured on


@dataclass
class RecipeResult:
    recipe: str
    design: str
    steps: int
    train_seconds: float
    tokens_per_s: float
    decoder_tokens_per_sample: float
    image_tokens_per_image: int
    forward_gflops_per_sample: float
    train_pflops: float  # the whole run: per-sample training FLOPs of each stage × samples it trained
    latency_ms: float  # one request, 16 new tokens, greedy
    text_loss_before: float | None
    text_loss_after: float
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # "0-shot" -> task -> score
    # a recipe that draws: decoder passes, seconds and guided MFLOPs per picture (``draw_cost``)
    drawing: dict[str, float] = field(default_factory=dict)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) of language-model steps


def apply_step_budget(config: RecipeConfig, steps: int) -> None:
    """Scale the stages' steps so they add up to ``steps``, keeping their proportions."""
    total = sum(s.steps for s in config.stages)
    for stage in config.stages:
        if stage.steps:
            stage.steps = max(1, round(steps * stage.steps / total))
            stage.warmup_steps = min(stage.warmup_steps, max(1, stage.steps // 10))


def compare(recipes: list[str], out: str | Path, *, steps: int | None = None, minutes: float | None = None,
            shots: tuple[int, ...] = (0, 4), per_task: int = 50, overrides: list[str] | None = None,
            log=print) -> list[RecipeResult]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in recipes:
        log(f"== {name}")
        results.append(run_one(name, out / _slug(name), label=_slug(name), steps=steps, minutes=minutes, shots=shots,
                               per_task=per_task, overrides=overrides or [], log=log))
        (out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    write_report(results, out, steps=steps, minutes=minutes, per_task=per_task, overrides=overrides or [])
    return results


def _config(name: str, overrides: list[str], steps: int | None) -> RecipeConfig:
    config = load_recipe(name, overrides)
    if steps:
        apply_step_budget(config, steps)
    config.train.checkpoint_every = 0  # a checkpoint at the end of each stage, all of them kept
    config.train.keep_checkpoints = len(config.stages) + 1
    return config


def run_one(name: str, run: Path, *, label: str, steps, minutes, shots, per_task, overrides, log) -> RecipeResult:
    config = _config(name, overrides, steps)
    started = time.perf_counter()
    train(config, run, log=lambda *_: None, seconds=minutes * 60 if minutes else None)
    train_seconds = time.perf_counter() - started
    metrics = read_metrics(run / "metrics.jsonl")
    model, tokenizer, saved = load_model(run, device="auto")
    source = build_source(saved.data)
    spec = ImageSpec.for_model(model, saved, root=source.root)
    cost = report(_config(name, overrides, steps), name=name)
    trained = trained_tasks(saved, source)
    tasks = [t for t in EVAL_TASKS if t in trained] + (["draw"] if model.draws and "draw" in trained else [])
    result = RecipeResult(
        recipe=label, design=_design(saved), steps=len(metrics), train_seconds=round(train_seconds, 1),
        tokens_per_s=round(sum(m["tokens"] for m in metrics) / max(1e-9, train_seconds), 1),
        decoder_tokens_per_sample=round(cost.sample_length, 1), image_tokens_per_image=cost.decoder_tokens,
        forward_gflops_per_sample=round(sum(cost.forward.values()) / 1e9, 4),
        train_pflops=float(f"{_train_flops(saved, cost, metrics) / 1e15:.4g}"),
        latency_ms=round(latency(model, tokenizer, spec, source, tasks) * 1000, 1),
        text_loss_before=_text_loss_before(run, saved, model, tokenizer, metrics),
        text_loss_after=text_loss(model, tokenizer, saved, source),
        losses=[(m["step"], m["loss"]) for m in metrics if m["loss"] is not None
                and saved.stages[m["stage"]].objective == "lm"],
    )
    if "draw" in tasks:
        result.drawing = draw_cost(model, tokenizer, spec, cost.drawing)
    for k in shots:
        asked = [t for t in tasks if k == 0 or t != "draw"]  # pictures are drawn from the prompt alone
        scored = evaluate(model, tokenizer, source, spec, split="test", per_task=per_task, tasks=asked, shots=k,
                          batch_size=saved.train.eval_batch_size)
        result.scores[f"{k}-shot"] = {r.task: round(r.score, 4) for r in scored}
    log(f"   {result.steps} steps in {result.train_seconds:.0f} s; 0-shot {result.scores.get('0-shot')}")
    return result


def _design(config: RecipeConfig) -> str:
    m = config.model
    parts = [m.fusion.kind, m.connector.kind]
    if m.tiling.max_tiles:
        parts.append(f"{m.tiling.max_tiles} tiles")
    if m.generation.kind != "none":
        parts.append(f"draws: {m.generation.kind}")
    return ", ".join(parts)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).stem if name.endswith(".yaml") else name)


def _train_flops(config: RecipeConfig, cost, metrics: list[dict]) -> float:
    total = 0.0
    for i, stage in enumerate(config.stages):
        trained = sum(1 for m in metrics if m["stage"] == i) * stage.batch_size * stage.grad_accum
        total += sum(cost.training.get(stage.name, {}).values()) * trained
    return total


@torch.no_grad()
def latency(model, tokenizer, spec: ImageSpec, source, tasks: list[str], new_tokens: int = 16,
            repeats: int = 3) -> float:
    """Seconds to answer one question about a typical image with ``new_tokens`` tokens: encoding the
    image, the prompt's prefill and ``new_tokens`` KV-cached decoding steps (the median of a few)."""
    task = next((t for t in tasks if t not in ("price", "motion")), tasks[0] if tasks else "color")
    sample = source.get(task, "test", 0)
    request = Request(next(m["content"] for m in sample.messages if m["role"] == "user"), sample.images)
    prompted = PromptEncoder.of(model, tokenizer, spec).request(request)
    device = next(model.parameters()).device
    ids = torch.tensor([model.coded(prompted.encoded.input_ids, prompted.drawn)], device=device)  # (1, T)
    pixels = ImageBatch.collate(prompted.inputs)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        context = model.encode_images(pixels.to(device), ids) if pixels is not None else None
        out = model(ids, context=context, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        for step in range(new_tokens):
            out = model(token, context=context, past_key_values=past, use_cache=True, query_start=ids.shape[1] + step)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return sorted(times[1:])[len(times[1:]) // 2]  # the first call warms up


@torch.no_grad()
def draw_cost(model, tokenizer, spec: ImageSpec, counted: dict[str, float], pictures: int = 24) -> dict[str, float]:
    """What a picture costs as the model draws by default (guidance included): its decoder passes and
    MFLOPs (``counted``: ``info.drawing_cost``), and the seconds per picture of ``pictures`` held-out
    GenEval prompts drawn in one batch (after one warm-up picture)."""
    sampling = Sampling.of(model.config.generation)
    prompt = EvalTask(name="draw", metric="geneval").prompt
    scenes = geneval_scenes(-(-pictures // len(CATEGORIES)))[:pictures]
    requests = [DrawRequest(prompt.format(question=s.prompt), seed=i) for i, s in enumerate(scenes)]
    draw(model, tokenizer, requests[:1], spec, sampling=sampling)
    started = time.perf_counter()
    draw(model, tokenizer, requests, spec, sampling=sampling)
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"passes": float(passes(model, sampling)), "seconds_per_picture": round(seconds / len(requests), 5),
            "mflops_per_picture": round((counted["flops_guided"] if sampling.cfg != 1 else counted["flops"]) / 1e6, 1)}


@torch.no_grad()
def text_loss(model, tokenizer, config: RecipeConfig, source) -> float:
    """The LLM's mean loss (nats per token) on held-out text-only documents."""
    if "text_only" not in source.tasks():
        return float("nan")
    prompts = PromptEncoder.of(model, tokenizer, None, max_length=config.model.llm.max_length)  # documents: no pictures
    docs = []
    for i in range(TEXT_DOCS):
        try:
            docs.append(prompts.sample(source.get("text_only", "val", i)))
        except SkipSample:
            continue
    batch = collate(docs, ["text_only"] * len(docs), [], tokenizer.pad_token_id)
    batch = batch.to(next(model.parameters()).device)
    logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]  # (B, T-1, V)
    targets = batch.labels[:, 1:]  # (B, T-1)
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), targets, ignore_index=-100,
                                               reduction="sum")
    return round(float(losses) / int((targets != -100).sum()), 4)


def _text_loss_before(run: Path, config: RecipeConfig, model, tokenizer, metrics: list[dict]) -> float | None:
    """The text loss at the end of the recipe's text-only stand-in stage, if it ran."""
    stage = next((i for i, s in enumerate(config.stages) if s.stand_in_for == "llm"), None)
    ends = [m["step"] for m in metrics if stage is not None and m["stage"] == stage]
    if not ends:
        return None
    ckpt = next((c for c in list_checkpoints(run) if c.name == f"step-{max(ends):06d}"), None)
    if ckpt is None:
        return None
    torch.manual_seed(0)
    before = build_model(config, tokenizer, pretrained=False).to(next(model.parameters()).device).eval()
    load_checkpoint_weights(before, ckpt)
    return text_loss(before, tokenizer, config, build_source(config.data))


# ----------------------------------------------------------------------------- report


def write_report(results: list[RecipeResult], out: Path, *, steps, minutes, per_task, overrides) -> None:
    plots = _plots(results, out)
    budget = f"{steps} optimizer steps" if steps else f"{minutes} minutes of training" if minutes else "as shipped"
    shot_keys = sorted({k for r in results for k in r.scores}, key=lambda k: int(k.split("-")[0]))
    found = {t for r in results for s in r.scores.values() for t in s}
    tasks = [t for t in EVAL_TASKS if t in found] + (["draw"] if "draw" in found else [])
    lines = ["# Design comparison", "",
             f"Each recipe trained on the synthetic world with the same budget ({budget} each), then scored on "
             f"its test split ({per_task} questions per task) by the same harness." +
             (f" Overrides: `{' '.join(overrides)}`." if overrides else ""), "",
             "## Cost", "",
             "| recipe | design | steps | train s | tokens/s | decoder tokens / sample | image positions / image | "
             "forward GFLOPs / sample | training PFLOPs | latency ms (image + prompt + 16 tokens) | "
             "text loss before → after |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        before = "—" if r.text_loss_before is None else f"{r.text_loss_before:.3f}"
        lines.append(f"| `{r.recipe}` | {r.design} | {r.steps} | {r.train_seconds:.0f} | {r.tokens_per_s:,.0f} | "
                     f"{r.decoder_tokens_per_sample:.0f} | {r.image_tokens_per_image} | "
                     f"{r.forward_gflops_per_sample:.3g} | {r.train_pflops:.3g} | {r.latency_ms:.0f} | "
                     f"{before} → {r.text_loss_after:.3f} |")
    for key in shot_keys:
        lines += ["", f"## Scores, {key}", "", "| recipe | " + " | ".join(tasks) + " | mean (exact-match tasks) |",
                  "| --- | " + " | ".join("---:" for _ in tasks) + " | ---: |"]
        for r in results:
            s = r.scores.get(key, {})
            lines.append(f"| `{r.recipe}` | " + " | ".join(f"{s[t]:.2f}" if t in s else "—" for t in tasks)
                         + f" | {mean_score(s):.3f} |")
    lines += ["", "Caption scores are CIDEr-D (0–10); every other task is a fraction correct. The mean leaves "
              "captions out, and drawing (`draw`: GenEval overall).", ""]
    lines += geneval_table(results)
    lines += [f"![{title}]({path.name})" for title, path in plots]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def mean_score(scores: dict[str, float]) -> float:
    """The mean of the understanding tasks' scores, captions (CIDEr-D) left out."""
    values = [v for t, v in scores.items() if t in EVAL_TASKS and t != "caption"]
    return sum(values) / len(values) if values else float("nan")


def geneval_table(results: list[RecipeResult]) -> list[str]:
    """GenEval per category of the recipes that draw (0-shot), beside their tokenizer's ceiling and FD."""
    drawing = [r for r in results if "draw" in r.scores.get("0-shot", {})]
    if not drawing:
        return []
    lines = ["## Drawing (GenEval on held-out prompts)", "",
             "| recipe | " + " | ".join(CATEGORIES) + " | overall | tokenizer ceiling | FD | decoder passes / picture "
             "| s / picture | MFLOPs / picture |",
             "| --- | " + " | ".join("---:" for _ in CATEGORIES) + " | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in drawing:
        s, d = r.scores["0-shot"], r.drawing
        cost = (f"{d['passes']:.0f} | {d['seconds_per_picture']:.4f} | {d['mflops_per_picture']:,.0f}" if d
                else "— | — | —")
        lines.append(f"| `{r.recipe}` | " + " | ".join(f"{s[f'draw/{c}']:.2f}" for c in CATEGORIES)
                     + f" | {s['draw']:.3f} | {s['draw/ceiling']:.2f} | {s['draw/fd']:.3f} | {cost} |")
    return lines + ["", "FD: Fréchet distance in the features of `fusionlm.evaluate.fd.WorldFeatures` (not FID). "
                    "A picture's cost as the model draws by default, guidance included: decoder passes (a masked or "
                    "diffusion model's steps, a next-scale model's scales, else one per written position), seconds per "
                    "picture in a batch of held-out prompts on this host, and FLOPs (`fusionlm info`).", ""]


def _plots(results: list[RecipeResult], out: Path) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        if r.losses:
            xs, ys = zip(*r.losses)
            ax.plot(xs, _smooth(ys), label=r.recipe, linewidth=1.2)
    ax.set(xlabel="optimizer step", ylabel="training loss (smoothed)", title="Loss curves (language-model stages)")
    ax.legend(fontsize=8)
    made.append(("Loss curves", _save(fig, out / "loss.png")))

    key = "0-shot" if any("0-shot" in r.scores for r in results) else next(iter(results[0].scores), None)
    if key:
        tasks = [t for t in EVAL_TASKS if t != "caption" and any(t in r.scores.get(key, {}) for r in results)]
        fig, ax = plt.subplots(figsize=(max(8, len(tasks) * 1.1), 4.5))
        width = 0.8 / max(1, len(results))
        for i, r in enumerate(results):
            ax.bar([x + i * width for x in range(len(tasks))], [r.scores[key].get(t, 0.0) for t in tasks], width,
                   label=r.recipe)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(tasks))], tasks)
        ax.set(ylabel="score", ylim=(0, 1), title=f"Scores by task and design ({key})")
        ax.legend(fontsize=8)
        made.append(("Scores by task", _save(fig, out / "scores.png")))

        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for r in results:
            ax.scatter(r.train_pflops, mean_score(r.scores.get(key, {})), s=40)
            ax.annotate(r.recipe, (r.train_pflops, mean_score(r.scores.get(key, {}))), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        ax.set(xlabel="training compute (PFLOPs)", ylabel=f"mean score ({key}, captions left out)",
               title="Cost vs accuracy")
        made.append(("Cost vs accuracy", _save(fig, out / "cost_vs_score.png")))
    drawing = [r for r in results if r.drawing and "draw" in r.scores.get("0-shot", {})]
    if drawing:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, (x, label) in zip(axes, ((lambda r: r.train_pflops, "training compute (PFLOPs)"),
                                         (lambda r: r.drawing["seconds_per_picture"], "seconds per picture (drawing)"))):
            for r in drawing:
                ax.scatter(x(r), r.scores["0-shot"]["draw"], s=40)
                ax.annotate(r.recipe, (x(r), r.scores["0-shot"]["draw"]), fontsize=8, xytext=(4, 4),
                            textcoords="offset points")
            ax.set(xlabel=label, ylabel="GenEval overall (0-shot)")
        fig.suptitle("GenEval against training compute and against drawing time")
        made.append(("GenEval vs compute and time", _save(fig, out / "geneval_cost.png")))
    return made


def _smooth(ys, window: int = 25) -> list[float]:
    out, acc = [], []
    for y in ys:
        acc.append(y)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc))
    return out


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
