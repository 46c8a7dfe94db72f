"""Optional metric reporting besides ``metrics.jsonl``: TensorBoard and Weights & Biases.

``train.report_to`` names the backends. Each library is imported only when asked for, before
step 0, so a missing one stops the run at once with the pip command that installs it. Only the
main process reports (the trainer builds a disabled ``Reporters`` on the other ranks).
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from ..config import REPORT_TO, RecipeConfig, to_dict
from ..errors import ConfigError

TB_DIR, WANDB_ID = "tensorboard", "wandb_id.txt"  # inside the run directory
INSTALL = {"tensorboard": "pip install 'fusionlm[tracking]' (or: pip install tensorboard)",
           "wandb": "pip install wandb"}
MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}


def scalars(record: dict, prefix: str = "train/") -> dict[str, float]:
    """The numeric entries of a metrics line, namespaced (``train/loss``, ``train/skipped/too_long``);
    ``step`` (the x axis), strings, booleans and None (a skipped step's loss) are left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            out[prefix + key] = value
    return out


def _import(name: str):
    """The backend's module, or a ConfigError saying what to install."""
    if name not in REPORT_TO:
        raise ConfigError(f"train.report_to: {name!r} is not one of {', '.join(REPORT_TO)}")
    try:
        return importlib.import_module(MODULES[name])
    except ImportError as exc:
        raise ConfigError(f"train.report_to: {name} is asked for but cannot be imported ({exc}); "
                          f"install it with: {INSTALL[name]}") from None


class Reporters:
    """The backends of ``train.report_to`` for one run directory: ``start``, ``log`` per step, ``close``."""

    def __init__(self, config: RecipeConfig, out: str | Path, *, enabled: bool = True) -> None:
        self.config, self.out = config, Path(out)
        names = list(dict.fromkeys(config.train.report_to)) if enabled else []
        self.modules = {name: _import(name) for name in names}  # fails here, before any step
        self.writers: dict[str, Any] = {}

    def start(self, step: int, *, resumed: bool) -> None:
        """Open each backend; ``step``: the last step already done (0 for a new run). A resumed
        run continues the same TensorBoard curves and W&B run, from ``step`` on."""
        if "tensorboard" in self.modules:
            # events past ``step`` (logged after the checkpoint resumed from) are hidden by TensorBoard
            self.writers["tensorboard"] = self.modules["tensorboard"].SummaryWriter(
                log_dir=str(self.out / TB_DIR), purge_step=step + 1)
        if "wandb" in self.modules:
            self.writers["wandb"] = self._wandb(resumed)

    def _wandb(self, resumed: bool):
        """``wandb.init`` with a run id kept in the run directory, so ``--resume`` continues that run."""
        path = self.out / WANDB_ID
        run_id = path.read_text().strip() if resumed and path.exists() else ""
        if not run_id:
            run_id = secrets.token_hex(4)
            path.write_text(run_id + "\n")
        return self.modules["wandb"].init(
            project=os.environ.get("WANDB_PROJECT", "fusionlm"), dir=str(self.out), config=to_dict(self.config),
            id=run_id, name=self.config.train.run_name or self.out.resolve().name, resume="allow")

    def log(self, record: dict, step: int) -> None:
        """Send one metrics line (as written to metrics.jsonl) as ``step``."""
        values = scalars(record)
        if "tensorboard" in self.writers:
            writer = self.writers["tensorboard"]
            for tag, value in values.items():
                writer.add_scalar(tag, value, global_step=step)
        if "wandb" in self.writers:
            self.modules["wandb"].log(values, step=step)

    def close(self, *, failed: bool = False) -> None:
        """Flush and close every backend (a W&B run that ``failed`` ends with exit code 1)."""
        writers, self.writers = self.writers, {}
        if "tensorboard" in writers:
            writers["tensorboard"].close()
        if "wandb" in writers:
            self.modules["wandb"].finish(exit_code=1 if failed else 0)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``, one per logged step, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def trim_metrics(path: Path, step: int) -> None:
    """Keep the lines of ``metrics.jsonl`` up to ``step`` (a resumed run's), so the file reads as
    one run. A last line without its newline was torn by a kill mid-write: it is dropped. The file
    is replaced atomically, so a kill here loses no line."""
    if not path.exists():
        return
    text = path.read_text()
    whole = text[: text.rfind("\n") + 1].split("\n")  # without a torn last line
    keep = [line for line in whole if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
