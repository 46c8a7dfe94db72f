"""What trains in a stage: declared as data (part names or parameter-name globs), applied here only."""

from __future__ import annotations

import fnmatch

from torch import nn

from ..config import TRAINABLE_GROUPS, LoraConfig
from ..errors import ConfigError
from ..lora import inject_for_stage, is_lora_param


def select_trainable(model: nn.Module, spec: list[str], *, key: str = "train") -> set[str]:
    """Names of the parameters that ``spec`` selects.

    ``spec`` items are part names (``encoder``, ``connector``, ``llm``, ``cross_attention``,
    ``all``) or globs over parameter names (``llm.model.layers.3.*``). A name or glob that selects
    nothing is an error: a typo must not silently freeze the whole model.
    """
    names = [n for n, _ in model.named_parameters()]
    chosen: set[str] = set()
    for item in spec:
        if item == "all":
            hit = set(names)
        elif item in TRAINABLE_GROUPS:
            hit = {n for n in names if model.part_of(n) == item}
        else:
            hit = {n for n in names if fnmatch.fnmatchcase(n, item)}
        if not hit:
            raise ConfigError(
                f"{key}: {item!r} selects no parameter of this model "
                f"(parts: {', '.join(TRAINABLE_GROUPS)}; or a glob over parameter names)"
            )
        chosen |= hit
    return chosen


def apply_trainable(model: nn.Module, spec: list[str], *, key: str = "train", log=print,
                    lora: LoraConfig | None = None) -> list[nn.Parameter]:
    """Freeze everything but ``spec``, print the table of counts, return the trainable parameters.

    ``lora``: the stage's LoRA settings; its adapters are injected first (leftover ones from an
    earlier stage merged) and train along with ``spec``, while the weights they adapt stay frozen.
    Without it, adapters left in the model are merged, so a plain stage sees a plain model.
    """
    lora_key = key.rsplit(".", 1)[0] + ".lora" if "." in key else "lora"
    inject_for_stage(model, lora, key=lora_key)
    chosen = select_trainable(model, spec, key=key) if spec else set()
    if lora is not None:
        chosen |= {n for n, _ in model.named_parameters() if is_lora_param(n)}
    trainable = []
    counts: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
        row = counts.setdefault(model.part_of(name) + (" (lora)" if is_lora_param(name) else ""), [0, 0])
        row[0 if name in chosen else 1] += param.numel()
        if name in chosen:
            trainable.append(param)
    log(trainable_table(counts))
    return trainable


def param_groups(model: nn.Module, params: list[nn.Parameter], lr: float, scale: dict[str, float]) -> list[dict]:
    """Optimizer groups: one per part, each at ``lr`` times that part's scale (default 1)."""
    part_of = {id(p): model.part_of(n) for n, p in model.named_parameters()}
    groups: dict[str, list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault(part_of[id(p)], []).append(p)
    return [{"params": ps, "lr": lr * scale.get(part, 1.0), "part": part} for part, ps in groups.items()]


def trainable_table(counts: dict[str, list[int]]) -> str:
    lines = [f"{'part':<16}{'trainable':>12}{'frozen':>12}"]
    total = [0, 0]
    for part, (t, f) in counts.items():
        lines.append(f"{part:<16}{t:>12,}{f:>12,}")
        total[0] += t
        total[1] += f
    lines.append(f"{'total':<16}{total[0]:>12,}{total[1]:>12,}")
    return "\n".join(lines)
