"""``fusionlm data check``: read every record and image of a dataset before training, and report."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..errors import FusionError
from .chat import check_placeholders
from .pixels.images import DEFAULT_MAX_PIXELS, load_image
from .pixels.video import Video


@dataclass
class Report:
    samples: Counter = field(default_factory=Counter)  # per task
    images: int = 0
    problems: list[str] = field(default_factory=list)

    def lines(self, limit: int) -> list[str]:
        out = [f"{sum(self.samples.values())} samples, {self.images} images"]
        out += [f"  {task}: {n}" for task, n in sorted(self.samples.items())]
        if self.problems:
            out.append(f"{len(self.problems)} problem(s):")
            out += [f"  {p}" for p in self.problems[:limit]]
            if len(self.problems) > limit:
                out.append(f"  … and {len(self.problems) - limit} more")
        else:
            out.append("no problems")
        return out


def check_source(source, *, max_pixels: int = DEFAULT_MAX_PIXELS, fits=None) -> Report:
    """Every record of every finite task of ``source``: readable, placeholders matching, images
    decodable; and, given ``fits`` (sample -> a problem or None), within a model's context."""
    report = Report(problems=list(getattr(source, "problems", [])))
    for task in source.tasks():
        if "/" not in task and hasattr(source, "sources"):
            continue  # a MultiSource's whole-source names repeat its name/task entries
        n = source.size(task)
        if n is None:
            continue  # a generated (unlimited) task: nothing to check
        for i in range(n):
            try:
                sample = source.get(task, "train", i)
                check_placeholders(sample)
            except FusionError as e:
                report.problems.append(str(e))
                continue
            report.samples[task] += 1
            if fits is not None:
                try:
                    problem = fits(sample)
                except FusionError as e:
                    problem = f"sample {sample.id}: {e}"
                if problem:
                    report.problems.append(problem)
            for image in sample.images:
                if isinstance(image, Video):
                    continue  # clips are checked when their frames are sampled
                report.images += 1
                try:
                    load_image(image, root=source.root, max_pixels=max_pixels)
                except FusionError as e:
                    report.problems.append(f"sample {sample.id}: {e}")
    return report
