"""The training loop: stages in order, AdamW with warmup + cosine, accumulation, clipping, bf16
autocast, per-step metrics, atomic checkpoints and exact resume."""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from ..checkpoint import (
    CONFIG, SHARDED, TOKENIZER, build_model, list_checkpoints, load_checkpoint_weights,
    recover_checkpoints, required_tokens, resolve_checkpoint, save_model, staging,
)
from ..config import RecipeConfig, StageConfig, load_config, save_config
from ..data.batching.batches import Batch, ImageSpec, MixtureBatches, check_mixture
from ..data.batching.packing import Packing
from ..data.prompt import PromptEncoder
from ..data.sources import build_source
from ..data.tokenizer import load_tokenizer
from ..llm import decoder_layers
from ..errors import CheckpointError, ConfigError, FusionError
from ..recipe import make_tokenizer
from .compiled import compile_layers, compiles
from .distributed import Group
from .objectives import objective_for
from .plots import plot_losses
from .precision import master_weights
from .progress import Counts, Progress
from .report import Reporters, trim_metrics
from .rng import rng_state, set_rng_state
from .schedule import lr_lambda
from .stages import apply_trainable, param_groups, select_trainable
from .step import TrainStep, zero_unused

TRAINER_STATE, OPTIMIZER_STATE = "trainer.json", "optimizer.pt"


class Trainer:
    def __init__(self, config: RecipeConfig, out: str | Path, *, resume: bool = False, log=print,
                 seconds: float | None = None):
        """``seconds``: a wall-clock budget for the whole run (see ``train``)."""
        # the trainer's own copy (an init_from checkpoint's model replaces its model section below);
        # the caller's config stays as it was given
        config = copy.deepcopy(config)
        self.seconds = seconds
        self.group = Group(config.train)
        self.config, self.out = config, Path(out)
        self.log = log if self.group.main else (lambda *_: None)
        log = self.log
        self.out.mkdir(parents=True, exist_ok=True)
        # train.report_to: a missing library stops the run here, before any work
        self.reporters = Reporters(config, self.out, enabled=self.group.main)
        self.threads = config.train.threads or torch.get_num_threads()  # a stage's threads: 0 -> these
        self.source = build_source(config.data)
        self.progress = Progress()
        ckpt = None
        if resume:
            if self.group.main:  # what a killed run left: half-written checkpoints, a swap cut short
                recover_checkpoints(self.out)
            found = list_checkpoints(self.out)
            if not found:
                log(f"{self.out}: no complete checkpoint to resume from; starting afresh")
            ckpt = found[-1] if found else None
        init = Path(config.train.init_from) if config.train.init_from and ckpt is None else None
        if init is not None:
            init = resolve_checkpoint(init)
            config.model = load_config(init / CONFIG).model  # the model is the checkpoint's, as saved
            log(f"starting from the weights of {init}")
        with self.group.main_first():  # rank 0 downloads hub files into the cache, the others then read them
            self.tokenizer = self._tokenizer(ckpt or init)
            torch.manual_seed(config.train.seed)
            random.seed(config.train.seed)
            self.model = build_model(config, self.tokenizer, pretrained=ckpt is None and init is None)
        self.config = config = replace(config, model=self.model.config)  # as built: vocabulary, end token, arch
        self._check_stages()
        self.device = self.group.device
        # low-precision parts that train: float32 masters (before any weights load), computed in bf16
        upcast = master_weights(self.model, config, log)
        self.autocast = config.train.bf16 or upcast is not None
        self.resume_state = None
        if init is not None:
            load_checkpoint_weights(self.model, init)
        if ckpt is not None:
            load_checkpoint_weights(self.model, ckpt)  # whole weights on every process, sharded below
            self.progress = Progress(**json.loads((ckpt / TRAINER_STATE).read_text()))
            self.resume_state = torch.load(ckpt / OPTIMIZER_STATE, weights_only=True, map_location="cpu")
            log(f"resuming from {ckpt} (step {self.progress.step})")
        self.resumed, self.resume_dir = ckpt is not None, ckpt
        self.model.to(self.device)
        if config.train.activation_checkpointing:
            self.model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.train_step = TrainStep(self.model, self.group)
        self.group.shard(self.train_step, sharded_layers(self.model), bf16=config.train.bf16)  # train.parallel: fsdp
        if self.group.main:
            save_config(config, self.out / "config.yaml")
        self.spec = ImageSpec.for_model(self.model, config, root=self.source.root)
        self.metrics_path = self.out / "metrics.jsonl"
        self.reported: dict[str, float] = {}  # the last step's objective metrics (``Objective.report``)
        if self.group.main:
            trim_metrics(self.metrics_path, self.progress.step)

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
            if stage.lora is not None and self.sharded_checkpoints:
                raise ConfigError(f"stages.{i}.lora: LoRA stages write whole checkpoints; "
                                  "set train.checkpoint_format: full")
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

    # ------------------------------------------------------------------ checkpoints

    @property
    def sharded_checkpoints(self) -> bool:
        return self.config.train.checkpoint_format == "sharded"

    def optimizer_state(self, optimizer) -> dict:
        """What a checkpoint keeps of ``optimizer``: its whole state, or this process's shards of it."""
        return self.group.optimizer_state(self.model, optimizer, full=not self.sharded_checkpoints)

    def save(self, optimizer, scheduler, state: dict | None = None) -> Path:
        """A checkpoint of the run as it stands; ``state``: the optimizer's (``optimizer_state``), when
        taken already. Every process must call it."""
        path = self.out / "checkpoints" / f"step-{self.progress.step:06d}"
        state = state if state is not None else self.optimizer_state(optimizer)
        rng = self.group.gather_objects(rng_state())  # each process's own (dropout differs per process)
        resume = {"scheduler": scheduler.state_dict(), "rng": rng}
        weights = staged = None
        if self.sharded_checkpoints:  # every process writes its shards into rank 0's temporary folder
            staged = self.group.gather_objects(staging(path) if self.group.main else None)[0]
            self.group.save_shards(self.model, state, staged / SHARDED)
        else:  # whole tensors, keyed by name, gathered from every process's shards; rank 0 writes them
            weights = self.group.model_state(self.model)
            resume["optimizer"] = state

        def extra(tmp: Path) -> None:
            (tmp / TRAINER_STATE).write_text(json.dumps(self.progress.__dict__))
            torch.save(resume, tmp / OPTIMIZER_STATE)

        if not self.group.main:  # rank 0 writes; the others wait until the checkpoint is complete
            self.group.barrier()
            return path
        save_model(self.model, self.tokenizer, self.config, path, extra=extra, state=weights, staged=staged)
        self.group.barrier()
        for old in list_checkpoints(self.out)[: -max(1, self.config.train.keep_checkpoints)]:
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
        return path

    # ------------------------------------------------------------------ the run

    def run(self) -> Progress:
        if self.resumed and self.progress.stage >= len(self.config.stages):
            self.log(f"{self.out}: this run finished at step {self.progress.step}, after all "
                     f"{len(self.config.stages)} stages; nothing to resume")
            return self.progress
        failed = True
        try:
            self.reporters.start(self.progress.step, resumed=self.resumed)
            for index in range(self.progress.stage, len(self.config.stages)):
                self._run_stage(index)
            failed = False
        finally:  # also when interrupted or stopped by an error: flush what was reported
            self.reporters.close(failed=failed)
            torch.set_num_threads(self.threads)  # a stage's own threads end with it
        if self.group.main and self.metrics_path.exists():
            plot_losses(self.metrics_path, self.out / "loss.png")
        return self.progress

    def _batches(self, index: int, stage: StageConfig, start: int):
        objective = objective_for(stage)
        spec = self.spec
        if objective.whole and spec.tiling is not None:
            # each image whole, letterboxed: the thumbnail's very pixels (also where the language
            # stages see tiles only, thumbnail: false), without cutting tiles it would not encode
            spec = replace(spec, tiling=None)
        dataset = MixtureBatches(
            self.source, stage.mixture, seed=self.config.train.seed, stage=index, batch_size=stage.batch_size,
            prompts=PromptEncoder.of(self.model, self.tokenizer, spec), rank=self.group.rank, world=self.group.world,
            pack=packing(self.config, self.model, objective), grad_accum=stage.grad_accum,
            condition_dropout=stage.condition_dropout,
            group_by_length=self.config.data.group_by_length and objective.packs,
        )
        order = range(start * stage.grad_accum, stage.steps * stage.grad_accum)
        workers = self.config.data.loader_workers
        if workers == 0:
            return (dataset[k] for k in order)
        return iter(torch.utils.data.DataLoader(dataset, sampler=order, batch_size=None, num_workers=workers,
                                                prefetch_factor=4, persistent_workers=False))

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
            self.progress.stage, self.progress.stage_step = index + 1, 0
            return
        self.log(f"stage {index} ({stage.name}): {stage.steps} steps, training {', '.join(stage.train)}")
        torch.set_num_threads(stage.threads or self.threads)
        params = apply_trainable(self.model, stage.train, key=f"stages.{index}.train", log=self.log, lora=stage.lora)
        groups = param_groups(self.model, params, stage.lr, stage.lr_scale)
        optimizer = torch.optim.AdamW(groups, lr=stage.lr, weight_decay=stage.weight_decay, betas=(0.9, 0.95),
                                      fused=fused_adam(params, self.device))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage))
        compile_layers(decoder_layers(self.model.llm),
                       compiles(self.config.train.compile, stage.steps * stage.grad_accum, self.device))
        engine = self.group.engine(self.train_step)  # DDP is built once the stage has chosen what trains
        if self.resume_state is not None and self.progress.stage == index and self.progress.stage_step > 0:
            self._load_state(optimizer, scheduler, self.resume_state)
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
            loss, tokens = self._step(stage, batches, optimizer, scheduler, params, engine)
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

        del engine
        state = self.optimizer_state(optimizer)  # named by the adapters, before they merge
        merged = merge(self.model)  # adapters fold into the base weights: what follows sees a plain model
        # the stage is done: its checkpoint resumes at the next stage (a finished run: at nothing)
        self.progress.stage, self.progress.stage_step = index + 1, 0
        path = self.save(optimizer, scheduler, state)
        if merged:  # the adapter alone, in peft's format, beside the stage's last checkpoint
            save_adapters(merged, path / ADAPTER_DIR)

    def _load_state(self, optimizer, scheduler, state: dict) -> None:
        """Optimizer, schedule and random state of a checkpoint taken mid-stage, on any number of processes."""
        saved = state.get("optimizer")
        if saved is None:  # a sharded checkpoint: each process reads its own part
            self.group.load_optimizer_shards(self.model, optimizer, self.resume_dir / SHARDED)
        elif any(isinstance(k, int) for k in saved["state"]):  # written before states were keyed by name
            optimizer.load_state_dict(saved)
        else:
            self.group.load_optimizer_state(self.model, optimizer, saved)
        scheduler.load_state_dict(state["scheduler"])
        rngs = state.get("rng") or [{"cpu": state["torch_rng"], "cuda": None}]
        set_rng_state(rngs[self.group.rank % len(rngs)])

    def _step(self, stage, batches, optimizer, scheduler, params, engine) -> tuple[float | None, int]:
        """One optimizer step over ``grad_accum`` micro-batches; None loss = no update (nothing to
        learn from, or a non-finite loss or gradient). The schedule advances either way: the
        learning rate stays a function of the step."""
        # Every micro-batch of the step is drawn, so the data position stays steps x grad_accum
        # and a resumed run sees the same batches.
        micro: list[Batch] = [next(batches) for _ in range(stage.grad_accum)]
        counts = Counts()
        for batch in micro:
            counts.add(batch, self.log)
        loss, tokens, items, finite = self._gradients(stage, micro, engine)
        if self.group.world == 1:
            zero_unused(params)
        self._count(counts)
        norm = self._grad_norm(params)
        optimizer_steps = items > 0 and finite and math.isfinite(norm)
        if optimizer_steps:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # A skipped update still advances the schedule on purpose; torch's "scheduler before
            # optimizer" warning would only repeat that choice back to the user.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            scheduler.step()
        if items == 0:
            return None, tokens
        if not optimizer_steps:
            return self._bad_step("loss" if not finite else f"gradient norm ({norm})"), tokens
        self.progress.bad_steps = 0
        self.progress.tokens += tokens
        return loss, tokens

    def _gradients(self, stage: StageConfig, micro: list[Batch], engine) -> tuple[float, int, int, bool]:
        """Back-propagate the step's micro-batches: (its loss, tokens, items, whether the loss is
        finite), each over all processes. Each process divides its summed loss by the items of the
        whole step (target tokens for ``lm``) and the engine sums the gradients over processes, once,
        with the last micro-batch: the gradients are those of one batch of all the step's samples."""
        objective = objective_for(stage)
        local = sum(objective.items(batch) for batch in micro if batch.sample_ids)
        (items,) = self.group.sum([local])
        shown, stats = 0.0, {}
        for k, batch in enumerate(micro):
            with self.group.accumulating(engine, sync=k == len(micro) - 1):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    train, part, sums = engine(batch.to(self.device) if batch.sample_ids else None, objective)
                (train / max(items, 1)).backward()  # a process without samples joins the reductions
            shown += float(part) / max(items, 1)
            for name, value in sums.items():
                stats[name] = stats.get(name, 0) + value.detach().double().cpu().reshape(-1)
        finite = math.isfinite(shown)
        loss, tokens, bad = self.group.sum([shown if finite else 0.0, sum(b.num_tokens for b in micro), not finite])
        self.reported = objective.report(self._sum_stats(stats)) if stats else {}
        return loss, int(tokens), int(items), not bad

    def _sum_stats(self, stats: dict[str, torch.Tensor]) -> dict[str, list[float]]:
        """Each of an objective's sums over all processes (every process has the same names)."""
        names = sorted(stats)
        flat = self.group.sum(torch.cat([stats[n] for n in names]).tolist())
        out, at = {}, 0
        for n in names:
            out[n], at = flat[at: at + len(stats[n])], at + len(stats[n])
        return out

    def _grad_norm(self, params: list[torch.nn.Parameter]) -> float:
        """The gradients' global L2 norm, after clipping them to ``train.grad_clip`` (0 or null: not clipped)."""
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.train.grad_clip or math.inf)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def _bad_step(self, what: str) -> None:
        self.progress.bad_steps += 1
        self.log(f"step {self.progress.step + 1}: non-finite {what}, step skipped (no update)")
        self.progress.skipped["nonfinite_step"] = self.progress.skipped.get("nonfinite_step", 0) + 1
        if self.progress.bad_steps >= self.config.train.max_bad_steps:
            raise FusionError(f"training stopped: {self.progress.bad_steps} non-finite steps in a row "
                              f"at step {self.progress.step + 1}; lower the learning rate or check the data")
        return None

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
               "samples_seen": p.samples_seen, "samples_trained": p.samples_trained, "skipped": dict(p.skipped),
               **self.reported}
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.reporters.log(row, p.step)


def fused_adam(params: list[torch.nn.Parameter], device: torch.device) -> bool | None:
    """torch's fused AdamW (one kernel over all weights; several times faster than its default on
    CPU) where it applies: plain CPU or CUDA tensors; None: torch's default elsewhere (DTensors)."""
    if device.type in ("cpu", "cuda") and not any(isinstance(p, DTensor) for p in params):
        return True
    return None


def packing(config: RecipeConfig, model, objective) -> Packing | None:
    """How a stage's batches are packed (``data.pack``): by default wherever packed rows compute
    each sample exactly as alone, i.e. for an objective that reads rows as token streams (``lm``)
    of a model that does not draw; None: one sample per row."""
    if config.data.pack is False or not objective.packs or (config.data.pack is None and model.draws):
        return None
    return Packing(config.model.llm.max_length, model.llm.config.get_text_config().hidden_size)


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
        trainer = Trainer(config, out, resume=resume, log=log, seconds=seconds)
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{out}: cannot {'resume' if resume else 'start'} a run here ({exc})") from None
    group, ok = trainer.group, False
    try:
        progress = trainer.run()
        ok = True
        return progress
    finally:
        del trainer  # its engines hold the process group
        group.close(ok=ok)
