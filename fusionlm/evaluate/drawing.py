"""Evaluating a model that draws: GenEval on the synthetic world (``evaluate.geneval``), next to the
tokenizer's ceiling and the FD of the pictures (``evaluate.fd``), as ``fusionlm eval`` reports them
for a drawing task (metric ``geneval``)."""

from __future__ import annotations

import random

import torch

from ..data.batching.batches import ImageSpec, stable_seed
from ..data.world.render import render_image
from ..data.world.scenes import CATEGORIES, draw_scene, geneval_scenes
from ..draw import DrawRequest, Sampling, draw
from ..errors import ConfigError
from ..image_tokenizers import images_of, pixels_of
from .fd import frechet_distance
from .geneval import check, geneval
from .metrics import GENEVAL
from .results import TaskResult
from .tasks import EvalTask


def draw_task(model, tokenizer, task: EvalTask, spec: ImageSpec, *, per_task: int = 50, batch_size: int = 32,
              seed: int = 0, progress=None, sampling: Sampling | None = None) -> list[TaskResult]:
    """GenEval on the synthetic world: ``per_task`` held-out prompts of each category
    (``scenes.geneval_scenes``), one picture each, drawn the way the model's config says
    (``model.generation``: guidance, temperature, top-k; or ``sampling``), prompt ``i`` with seed ``seed + i``.
    Results: the task overall (GenEval's mean of the categories), then one per category."""
    if not model.draws:
        raise ConfigError(f"task {task.name}: a drawing task, and this model does not draw "
                          "(model.generation.kind: none)")
    sampling = sampling or Sampling.of(model.config.generation)
    scenes = geneval_scenes(per_task, seed=seed)
    pictures = []
    for start in range(0, len(scenes), batch_size):
        reqs = [DrawRequest(task.prompt.format(question=s.prompt), seed=seed + start + i, id=f"geneval/{start + i}")
                for i, s in enumerate(scenes[start:start + batch_size])]
        pictures.extend(draw(model, tokenizer, reqs, spec, sampling=sampling))
    verdicts = [check(s, p) for s, p in zip(scenes, pictures)]
    scores = geneval(scenes, pictures)
    examples = [{"id": f"geneval/{i}", "question": s.prompt, "category": s.category, "score": float(v.ok),
                 "failed": v.failed} for i, (s, v) in enumerate(zip(scenes, verdicts))]
    results = [TaskResult(task.name, GENEVAL, scores["overall"], len(scenes), examples=examples)]
    for category in CATEGORIES:
        mine = [e for e in examples if e["category"] == category]
        results.append(TaskResult(f"{task.name}/{category}", GENEVAL, scores[category], len(mine), examples=mine))
    references = reference_pictures(scenes, model.image_tokenizer.config.image_size, seed)
    ceiling = geneval(scenes, reconstructed(model.image_tokenizer, references))["overall"]
    results.append(TaskResult(f"{task.name}/ceiling", GENEVAL, ceiling, len(scenes)))
    results.append(TaskResult(f"{task.name}/fd", "fd", frechet_distance(references, pictures), len(scenes)))
    if progress:
        progress(f"{task.name:<10} {GENEVAL:<18} {scores['overall']:.3f}  (n={len(scenes)}: "
                 + ", ".join(f"{c} {scores[c]:.2f}" for c in CATEGORIES)
                 + f"; the tokenizer's ceiling {ceiling:.2f}, FD {results[-1].score:.3f})")
    return results


def reference_pictures(scenes, size: int, seed: int = 0) -> list:
    """A world picture that satisfies each scene (what GenEval scores 1.0), drawn at ``size``."""
    return [render_image(draw_scene(s, random.Random(stable_seed(seed, "reference", i)), size))
            for i, s in enumerate(scenes)]


@torch.no_grad()
def reconstructed(image_tokenizer, pictures: list) -> list:
    """``pictures`` through the image tokenizer's codes and back: what a model that wrote exactly the
    right codes would draw (GenEval of these is the tokenizer's ceiling)."""
    size = image_tokenizer.config.image_size
    return images_of(image_tokenizer.decode(image_tokenizer.encode(pixels_of(pictures, size))))
