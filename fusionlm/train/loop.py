"""The training loop: stages in order, AdamW with warmup + cosine, accumulation, clipping, bf16
autocast, per-step metrics, atomic checkpoints and exact resume."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint import (
    CONFIG, TOKENIZER, WEIGHTS, build_model, list_checkpoints, load_weights, needs_newline, required_tokens,
    resolve_checkpoint, save_model,
)
from ..config import RecipeConfig, StageConfig, load_config, save_config
from ..data.batches import Batch, ImageSpec, MixtureBatches, check_mixture
from ..data.sources import build_source
from ..data.chat import IGNORE
from ..device import resolve_device
from ..llm import decoder_layers
from .distributed import Group
from ..data.tokenizer import load_any_tokenizer, load_tokenizer, prepare_tokenizer, train_tokenizer
from ..errors import CheckpointError, ConfigError, FusionError
from .objectives import loss_for
from .report import Reporters
from .stages import apply_trainable, param_groups, select_trainable

TRAINER_STATE, OPTIMIZER_STATE = "trainer.json", "optimizer.pt"


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint."""

    stage: int = 0
    stage_step: int = 0
    step: int = 0  # optimizer steps over all stages
    samples_seen: int = 0
    samples_trained: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    bad_steps: int = 0  # non-finite losses skipped
    tokens: int = 0


def lr_lambda(stage: StageConfig):
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak."""

    def factor(step: int) -> float:
        if step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        span = max(1, stage.steps - stage.warmup_steps)
        t = min(1.0, (step - stage.warmup_steps) / span)
        return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


class Trainer:
    def __init__(self, config: RecipeConfig, out: str | Path, *, resume: bool = False, log=print):
        self.group = Group(config.train.parallel)
        self.config, self.out = config, Path(out)
        self.log = log if self.group.main else (lambda *_: None)
        log = self.log
        self.out.mkdir(parents=True, exist_ok=True)
        # train.report_to: a missing library stops the run here, before any work
        self.reporters = Reporters(config, self.out, enabled=self.group.main)
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        self.source = build_source(config.data)
        self.progress = Progress()
        ckpt = None
        if resume:
            if self.group.main:  # checkpoints a killed run left half written: never complete, never read
                for tmp in (self.out / "checkpoints").glob(".step-*.tmp-*"):
                    shutil.rmtree(tmp, ignore_errors=True)
            found = list_checkpoints(self.out)
            if not found:
                log(f"{self.out}: no complete checkpoint to resume from; starting afresh")
            ckpt = found[-1] if found else None
        init = Path(config.train.init_from) if config.train.init_from and ckpt is None else None
        if init is not None:
            init = resolve_checkpoint(init)
            config.model = load_config(init / CONFIG).model  # the model is the checkpoint's, as saved
            log(f"starting from the weights of {init}")
        self.tokenizer = self._tokenizer(ckpt or init)
        torch.manual_seed(config.train.seed)
        random.seed(config.train.seed)
        self.model = build_model(config, self.tokenizer, pretrained=ckpt is None and init is None)
        self._check_stages()
        self.device = resolve_device(config.train.device)
        self.resume_state = None
        if init is not None:
            load_weights(self.model, init / WEIGHTS)
        if ckpt is not None:
            load_weights(self.model, ckpt / WEIGHTS)
            self.progress = Progress(**json.loads((ckpt / TRAINER_STATE).read_text()))
            self.resume_state = torch.load(ckpt / OPTIMIZER_STATE, weights_only=True, map_location="cpu")
            log(f"resuming from {ckpt} (step {self.progress.step})")
        self.resumed = ckpt is not None
        self.model.to(self.device)
        self.group.shard(sharded_layers(self.model))  # train.parallel: fsdp
        if config.train.compile:
            for layer in decoder_layers(self.model.llm):
                layer.compile()  # in place: parameter names (and checkpoints) unchanged
        if self.group.main:
            save_config(config, self.out / "config.yaml")
        self.images = ImageSpec.for_model(self.model, config, root=self.source.root)
        self.metrics_path = self.out / "metrics.jsonl"
        self._trim_metrics()

    def _check_stages(self) -> None:
        """Every stage's parts and tasks, checked before step 0: a typo in the last stage must not
        surface only after the earlier stages have trained."""
        for i, stage in enumerate(self.config.stages):
            if stage.batch_size % self.group.world:
                raise ConfigError(f"stages.{i}.batch_size: {stage.batch_size} does not split evenly over "
                                  f"{self.group.world} processes (it is the global batch)")
            select_trainable(self.model, stage.train, key=f"stages.{i}.train")
            if stage.lora is not None and self.group.sharded:
                raise ConfigError(f"stages.{i}.lora: LoRA stages do not run with train.parallel fsdp yet; use ddp")
            if stage.lora is not None:
                from ..lora import check_targets

                check_targets(self.model, stage.lora, key=f"stages.{i}.lora")
            check_mixture(stage.mixture, self.source, key=f"stages.{i}.mixture")

    def _tokenizer(self, ckpt: Path | None):
        """The checkpoint's tokenizer, else ``make_tokenizer``'s (a newly trained one is saved too)."""
        if ckpt is not None:
            return load_tokenizer(ckpt / TOKENIZER, required_tokens(self.config))
        tok = make_tokenizer(self.config, self.source)
        if self.config.model.tokenizer.path is None and self.config.model.llm.hf is None and self.group.main:
            tok.save_pretrained(str(self.out / TOKENIZER))
        return tok

    def _trim_metrics(self) -> None:
        """Keep only the lines up to the resumed step, so the file reads as one run. A last line
        without its newline was torn by a kill mid-write: it is dropped. The file is replaced
        atomically, so a kill here loses no line."""
        if not self.group.main or not self.metrics_path.exists():
            return
        text = self.metrics_path.read_text()
        whole = text[: text.rfind("\n") + 1].split("\n")  # without a torn last line
        keep = [line for line in whole if line.strip() and json.loads(line)["step"] <= self.progress.step]
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.metrics_path)

    # ------------------------------------------------------------------ checkpoints

    def save(self, optimizer, scheduler) -> Path:
        path = self.out / "checkpoints" / f"step-{self.progress.step:06d}"

        # sharded (fsdp) tensors are gathered whole by every process; rank 0 writes them
        weights = self.group.full_state(self.model) if self.group.sharded else None
        state = self.group.full_optimizer_state(optimizer) if self.group.sharded else optimizer.state_dict()

        def extra(tmp: Path) -> None:
            (tmp / TRAINER_STATE).write_text(json.dumps(self.progress.__dict__))
            torch.save({"optimizer": state, "scheduler": scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state()}, tmp / OPTIMIZER_STATE)

        if not self.group.main:  # rank 0 writes; the others wait until the checkpoint is complete
            self.group.barrier()
            return path
        save_model(self.model, self.tokenizer, self.config, path, extra=extra, state=weights)
        self.group.barrier()
        for old in list_checkpoints(self.out)[: -max(1, self.config.train.keep_checkpoints)]:
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
        return path

    # ------------------------------------------------------------------ the run

    def run(self) -> Progress:
        failed = True
        try:
            self.reporters.start(self.progress.step, resumed=self.resumed)
            for index in range(self.progress.stage, len(self.config.stages)):
                self._run_stage(index)
                self.progress.stage, self.progress.stage_step = index + 1, 0
            failed = False
        finally:  # also when interrupted or stopped by an error: flush what was reported
            self.reporters.close(failed=failed)
        if self.group.main and self.metrics_path.exists():
            plot_losses(self.metrics_path, self.out / "loss.png")
        return self.progress

    def _batches(self, index: int, stage: StageConfig, start: int):
        dataset = MixtureBatches(
            self.source, stage.mixture, seed=self.config.train.seed, stage=index, batch_size=stage.batch_size,
            tokenizer=self.tokenizer, layout=self.model.layout, max_length=self.config.model.llm.max_length,
            images=self.images, image_token=self.config.model.tokenizer.image_token,
            end_token=self.config.model.tokenizer.end_token, rank=self.group.rank, world=self.group.world,
            pack=self.config.data.pack,
        )
        order = range(start * stage.grad_accum, stage.steps * stage.grad_accum)
        workers = self.config.data.loader_workers
        if workers == 0:
            return (dataset[k] for k in order)
        return iter(torch.utils.data.DataLoader(dataset, sampler=order, batch_size=None, num_workers=workers,
                                                prefetch_factor=4, persistent_workers=False))

    seconds: float | None = None  # a wall-clock budget for the whole run (see ``train``)

    def _time_share(self, stage: StageConfig) -> float | None:
        if self.seconds is None:
            return None
        total = sum(s.steps for s in self.config.stages if not (s.stand_in_for and self.pretrained(s.stand_in_for)))
        return self.seconds * stage.steps / max(1, total)

    def pretrained(self, part: str) -> bool:
        """Whether ``part`` (llm or encoder) came pretrained: from ``hf`` or from ``init_from``."""
        section = getattr(self.config.model, part)
        return bool(section.hf or self.config.train.init_from)

    def _run_stage(self, index: int) -> None:
        stage = self.config.stages[index]
        if stage.stand_in_for and self.pretrained(stage.stand_in_for):
            self.log(f"stage {index} ({stage.name}): skipped, the {stage.stand_in_for} is pretrained")
            return
        self.log(f"stage {index} ({stage.name}): {stage.steps} steps, training {', '.join(stage.train)}")
        params = apply_trainable(self.model, stage.train, key=f"stages.{index}.train", log=self.log, lora=stage.lora)
        groups = param_groups(self.model, params, stage.lr, stage.lr_scale)
        optimizer = torch.optim.AdamW(groups, lr=stage.lr, weight_decay=stage.weight_decay, betas=(0.9, 0.95))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage))
        if self.resume_state is not None and self.progress.stage == index and self.progress.stage_step > 0:
            self.group.load_optimizer_state(optimizer, self.resume_state["optimizer"])
            scheduler.load_state_dict(self.resume_state["scheduler"])
            torch.set_rng_state(self.resume_state["torch_rng"])
        self.resume_state = None
        self.model.train()
        batches = self._batches(index, stage, self.progress.stage_step)
        bar = tqdm(total=stage.steps, initial=self.progress.stage_step, desc=f"stage {index} {stage.name}",
                   dynamic_ncols=True, disable=None if self.group.main else True)
        every = self.config.train.checkpoint_every
        share = self._time_share(stage)
        stage_started = time.perf_counter()
        while self.progress.stage_step < stage.steps:
            if share is not None and time.perf_counter() - stage_started > share:
                self.log(f"stage {index} ({stage.name}): its {share:.0f} s of the time budget are spent after "
                         f"{self.progress.stage_step} of {stage.steps} steps")
                break
            started = time.perf_counter()
            loss, tokens = self._step(stage, batches, optimizer, scheduler, params)
            elapsed = time.perf_counter() - started
            self.progress.stage_step += 1
            self.progress.step += 1
            self._log_step(index, stage, loss, tokens, elapsed, scheduler.get_last_lr()[0])
            bar.set_postfix(loss=f"{loss:.3f}" if loss is not None else "skip", tok_s=f"{tokens / elapsed:.0f}",
                            skipped=sum(self.progress.skipped.values()))
            bar.update(1)
            if every and self.progress.step % every == 0 and self.progress.stage_step < stage.steps:
                self.save(optimizer, scheduler)
        bar.close()
        from ..lora import ADAPTER_DIR, merge, save_adapters  # LoRA stages (see fusionlm.lora)

        merged = merge(self.model)  # adapters fold into the base weights: what follows sees a plain model
        path = self.save(optimizer, scheduler)
        if merged:  # the adapter alone, in peft's format, beside the stage's last checkpoint
            save_adapters(merged, path / ADAPTER_DIR)

    def _step(self, stage, batches, optimizer, scheduler, params) -> tuple[float | None, int]:
        """One optimizer step over ``grad_accum`` micro-batches; None loss = skipped (non-finite)."""
        total, tokens, micro, finite = 0.0, 0, 0, True
        counts = Counts()
        for _ in range(stage.grad_accum):
            # Every micro-batch of the step is drawn, even after a bad one, so the data position
            # stays steps x grad_accum and a resumed run sees the same batches.
            batch: Batch = next(batches)
            counts.add(batch, self.log)
            # this process's share of the micro-batch's loss (``distributed``): its target tokens
            # over all processes' (language-model loss), or 1/W of the batch's (other objectives)
            share = self._loss_share(stage, batch)
            if not batch.sample_ids:
                self._idle_pass()
                continue
            if not finite and not self.group.sharded:
                continue  # the step is lost already (with sharded layers every process runs on)
            batch = batch.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.train.bf16):
                loss = loss_for(stage.objective)(self.model, batch) * share / stage.grad_accum
            finite = finite and bool(torch.isfinite(loss))
            if finite or self.group.sharded:
                loss.backward()  # sharded layers: every process runs every backward (their collectives)
            if not finite:
                continue
            total += float(loss.detach())
            tokens += batch.num_tokens
            micro += 1
        bad, micro, total, tokens = self.group.sum([float(not finite), micro, total, tokens])
        tokens = int(tokens)
        self._count(counts)
        if bad:
            optimizer.zero_grad(set_to_none=True)
            return self._bad_step(), tokens
        if micro == 0:
            return None, tokens
        self.group.sum_grads(params)
        self.group.clip_grad_norm(params, self.config.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        self.progress.bad_steps = 0
        self.progress.tokens += tokens
        return total, tokens  # the micro-batches' scaled losses add up to the batch's mean

    def _idle_pass(self) -> None:
        """A process left without samples in a micro-batch still runs the sharded layers' forward and
        backward (with zero gradient), which the other processes' collectives wait for."""
        if not self.group.sharded:
            return
        ids = torch.full((1, 1), self.model.ids.pad, device=self.device)
        (self.model(ids).logits.sum() * 0.0).backward()

    def _bad_step(self) -> None:
        self.progress.bad_steps += 1
        self.log(f"step {self.progress.step + 1}: non-finite loss, step skipped (no update)")
        self.progress.skipped["nonfinite_step"] = self.progress.skipped.get("nonfinite_step", 0) + 1
        if self.progress.bad_steps >= self.config.train.max_bad_steps:
            raise FusionError(f"training stopped: {self.progress.bad_steps} non-finite losses in a row "
                              f"at step {self.progress.step + 1}; lower the learning rate or check the data")
        return None

    def _loss_share(self, stage: StageConfig, batch: Batch) -> float:
        if self.group.world == 1:
            return 1.0
        if stage.objective != "lm":
            return 1.0 / self.group.world
        local = int((batch.labels[:, 1:] != IGNORE).sum()) if batch.sample_ids else 0
        (everyone,) = self.group.sum([local])
        return local / everyone if everyone else 0.0

    def _count(self, counts: "Counts") -> None:
        p = self.progress
        seen, trained, *skipped = self.group.sum([counts.seen, counts.trained, *counts.skipped.values()])
        p.samples_seen += int(seen)
        p.samples_trained += int(trained)
        for reason, n in zip(counts.skipped, skipped):
            if n:
                p.skipped[reason] = p.skipped.get(reason, 0) + int(n)
        bad = sum(v for k, v in p.skipped.items() if k != "nonfinite_step")
        limit = self.config.data.max_bad_fraction
        if p.samples_seen >= 50 and bad > limit * p.samples_seen:
            raise FusionError(f"training stopped: {bad} of {p.samples_seen} samples unusable "
                              f"({p.skipped}), over data.max_bad_fraction={limit}")

    def _log_step(self, index: int, stage: StageConfig, loss, tokens: int, elapsed: float, lr: float) -> None:
        p = self.progress
        if not self.group.main:
            return
        row = {"step": p.step, "stage": index, "stage_name": stage.name, "stage_step": p.stage_step,
               "loss": loss, "lr": lr, "tokens": tokens, "tokens_per_s": tokens / elapsed if elapsed else None,
               "samples_seen": p.samples_seen, "samples_trained": p.samples_trained, "skipped": dict(p.skipped)}
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.reporters.log(row, p.step)


def plot_losses(metrics: Path, out: Path) -> None:
    """The run's loss per step, one colour per stage, as a PNG next to its metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(8, 4))
    for stage in sorted({r["stage"] for r in rows}):
        points = [(r["step"], r["loss"]) for r in rows if r["stage"] == stage and r["loss"] is not None]
        if points:
            ax.plot(*zip(*points), linewidth=1, label=next(r["stage_name"] for r in rows if r["stage"] == stage))
    ax.set(xlabel="optimizer step", ylabel="loss", title=f"training loss ({metrics.parent.name})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


class Counts:
    """A step's samples, counted in this process (``Trainer._count`` sums them over processes)."""

    REASONS = ("too_long", "no_target", "bad_image", "bad_sample")

    def __init__(self) -> None:
        self.seen = self.trained = 0
        self.skipped = {r: 0 for r in self.REASONS}

    def add(self, batch: Batch, log) -> None:
        self.seen += len(batch.sample_ids) + len(batch.skipped)
        self.trained += len(batch.sample_ids)
        for skip in batch.skipped:
            self.skipped[skip.reason] = self.skipped.get(skip.reason, 0) + 1
            log(f"skipped {skip.detail}")


def make_tokenizer(config: RecipeConfig, source):
    """A saved tokenizer; else the LLM's own (made ready for images); else one trained on the data."""
    tcfg, llm = config.model.tokenizer, config.model.llm
    if tcfg.path and llm.hf is None:
        return load_tokenizer(tcfg.path)
    if tcfg.path or llm.hf:
        tok = load_any_tokenizer(tcfg.path or llm.hf, allow_custom_code=llm.allow_custom_code)
        return prepare_tokenizer(tok, image_token=tcfg.image_token, newline_token=tcfg.newline_token,
                                 need_newline=needs_newline(config.model))
    return train_tokenizer(source.corpus(tcfg.corpus_per_task, trained_tasks(config, source)), tcfg.vocab_size)


def trained_tasks(config: RecipeConfig, source) -> list[str]:
    """The tasks some stage of the recipe trains on."""
    tasks = set()
    for i, stage in enumerate(config.stages):
        mixture = check_mixture(stage.mixture, source, key=f"stages.{i}.mixture")
        tasks.update(t for t, w in mixture.items() if w > 0)
    return sorted(tasks)


def sharded_layers(model) -> list[torch.nn.Module]:
    """The LLM's decoder layers that every forward pass runs (``fsdp`` shards these). Llama 3.2
    Vision's cross-attention layers are left out: a text-only batch skips them."""
    skip = set(model.llm.config.cross_attention_layers) if model.native_cross else set()
    return [layer for i, layer in enumerate(decoder_layers(model.llm)) if i not in skip]


def train(config: RecipeConfig, out: str | Path, *, resume: bool = False, log=print,
          seconds: float | None = None) -> Progress:
    """Train ``config`` into ``out``. ``seconds``: a wall-clock budget, shared among the stages in
    proportion to their steps; a stage whose share runs out ends early (its schedule truncated)."""
    try:
        trainer = Trainer(config, out, resume=resume, log=log)
        trainer.seconds = seconds
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{out}: cannot {'resume' if resume else 'start'} a run here ({exc})") from None
    return trainer.run()
