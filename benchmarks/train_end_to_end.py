"""Training end to end: fusionlm's own loop against transformers' ``Trainer`` on the same LLaVA,
the same samples, the same optimizer and the same number of steps; wall time, real tokens/s and the
loss curves (which must agree within noise: the math is the same).

    python benchmarks/train_end_to_end.py [--config demo|smollm|both] [--steps N] [--rounds R] [--quick]

Three arms, each a fresh subprocess of this script, timed in turn (A B C A B C ...) so that the
machine's drift falls on all of them alike:

- ``fusionlm``: ``fusionlm.train.loop.Trainer(config, out).run()`` on a recipe of one stage, the
  demo's ``instruct`` stage (encoder frozen, connector + LLM train), with fusionlm's defaults for
  everything the recipe does not set (``data.pack`` included: whatever the default is when it runs);
- ``padded``: transformers' ``Trainer`` + ``LlavaForConditionalGeneration``, each batch padded to its
  longest sample (input_ids / labels / attention_mask), pixel_values stacked;
- ``flattened``: the same with transformers' padding-free ``DataCollatorWithFlattening`` (a batch is
  one row, position_ids restart at each sample, no attention_mask), pixel_values concatenated.
  transformers keeps the samples apart only when ``masking_utils.find_packed_sequence_indices`` runs,
  i.e. with no attention_mask *and no cache*; with the exported config's ``use_cache=True``
  (transformers' default) ``LlamaModel`` makes a ``DynamicCache`` even in training and the samples
  attend to each other. So both transformers arms train with ``use_cache=False`` (which also spares
  the padded arm a useless cache); the parity check prints the loss with and without it.

Same weights: the model is built from the recipe (``build_model``; for ``smollm`` its vocabulary
padded to 49,152 rows, which are never targets, as ``head_at_targets.py`` does), saved as a fusionlm
checkpoint that the stage starts from (``train.init_from``) and exported to transformers
(``fusionlm.interop.export_checkpoint(..., "llava")``). Checked before timing: the weights of the
model fusionlm's ``Trainer`` builds equal the LLaVA's bit for bit, and their losses on one batch agree.

Same data: the samples of fusionlm's ``MixtureBatches`` (step k = sample numbers k*B ... k*B+B-1, the
ones it skips skipped on both sides), encoded by the same ``PromptEncoder`` (so the same pixel
tensors and image token ids; LLaVA's image token id and tokens per image come from the export).
Checked before timing: each step's samples, real tokens and target tokens equal those of fusionlm's
own batches, as its loop builds them.

Timing covers the training itself, data preparation included on every side: fusionlm encodes its
samples inside its loop (in ``data.loader_workers`` background processes, prefetching 4 batches), so
the transformers arms encode the same samples the same way inside ``Trainer.train()`` (a dataset
whose item k encodes step k, a DataLoader with the same workers and prefetch). That is the work a
user of either library pays; pre-encoding alone is timed apart (in the parent process) and printed,
so its share is visible. fusionlm's time ends where its loop calls its end-of-stage checkpoint save
(the transformers arms save nothing); the model build and, on the transformers side, the weight
loading are outside the timed part on both.

Same optimizer: fusionlm's loop builds AdamW (betas 0.9/0.95, eps 1e-8, the stage's weight decay),
the warmup + cosine schedule of ``fusionlm.train.schedule.lr_lambda`` (given to transformers'
Trainer as its scheduler: transformers' own cosine warmup starts at 0, fusionlm's at 1/warmup) and
clips the gradients' norm to ``train.grad_clip``; the Trainer gets the same numbers
(``TrainingArguments`` with transformers' default AdamW implementation, ``adamw_torch_fused``).
Each step's loss is the sum over its target tokens / their count on every side (grad_accum 1).

Printed per arm: wall seconds (median, min–max over the rounds), CPU seconds of the arm's process
and its DataLoader workers over the same span (less sensitive than wall time to the other tenants
of a shared machine), the mean step after the first (which holds the start-up: workers, first
allocations), real tokens/s (the samples' tokens, padding excluded, the same count for every arm),
fusionlm's speed-up (ratio of the medians, and the range of the per-round ratios) and the loss
curves' first and last values and largest difference from the padded arm's.

Defaults: demo 40 steps, smollm 20 steps, 3 rounds (about 6 minutes on a quiet 2-core machine).

Also, for ``smollm``: the achieved FLOP/s of fusionlm's training, its FLOPs counted with
``torch.utils.flop_counter.FlopCounterMode`` (attention products included: ``count_cpu_attention``)
on its first steps' forward + backward, as a share of the best of fp32 1024³ and 2048³ matrix
products timed in turn in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from common import machine, timed_alternately

VOCAB = 49_152  # SmolLM's vocabulary
SMOLLM = {"hidden_size": 576, "num_heads": 9, "num_kv_heads": 3, "intermediate_size": 1536, "num_layers": 2}
CONFIGS = {"demo": {"batch": 32, "steps": 40}, "smollm": {"batch": 16, "steps": 20}}
ARMS = ("fusionlm", "padded", "flattened")
LR = 2e-3
TOLERANCE = 1e-5


def quiet(*_args, **_kw) -> None:
    pass


def cpu_s() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of its ended children (DataLoader workers)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time(), children.ru_utime + children.ru_stime


# ----------------------------------------------------------------------------- the recipe and model


def recipe(name: str, steps: int):
    """The demo recipe's model (SmolLM-shaped LLM for ``smollm``), data and train sections, and its
    ``instruct`` stage alone: ``steps`` steps, the warmup scaled down in proportion, lr 2e-3."""
    from fusionlm.config import load_recipe

    config = load_recipe("demo")
    instruct = next(s for s in config.stages if s.name == "instruct")
    warmup = max(1, round(instruct.warmup_steps * steps / instruct.steps))
    stage = replace(instruct, steps=steps, warmup_steps=warmup, batch_size=CONFIGS[name]["batch"], lr=LR)
    # The comparison runs the same model as transformers' LLaVA, so the tower keeps LLaVA's linear
    # patch embedding (the demo's own conv stem does not export; the figures were measured so).
    model = replace(config.model, encoder=replace(config.model.encoder, stem="patch"))
    if name == "smollm":
        model = replace(model, llm=replace(model.llm, **SMOLLM))
    return replace(config, model=model, stages=[stage])


def setup(name: str, steps: int, root: Path) -> dict:
    """Build the model, save it as the stage's ``init_from`` checkpoint, export it to LLaVA; write
    the run's recipe. Returns facts about the model."""
    from fusionlm.checkpoint import build_model, save_model
    from fusionlm.config import save_config
    from fusionlm.data.sources import build_source
    from fusionlm.hub import arch_of
    from fusionlm.interop import export_checkpoint
    from fusionlm.recipe import make_tokenizer

    config = recipe(name, steps)
    source = build_source(config.data)
    tokenizer = make_tokenizer(config, source)
    torch.manual_seed(config.train.seed)
    model = build_model(config, tokenizer)
    if name == "smollm":  # a real vocabulary: the rows past the tokenizer's are never targets
        model.llm.resize_token_embeddings(VOCAB, mean_resizing=False)
        # recorded as the LLM's architecture, so that the checkpoint rebuilds it with 49,152 rows
        # (a random LLM's vocabulary is otherwise the tokenizer's)
        model.config.llm.arch = arch_of(model.llm.config)
        model.config.llm.vocab_size = VOCAB
    init = save_model(model.eval(), tokenizer, config, root / "init")
    export_checkpoint(init, root / "llava", "llava", log=quiet)
    save_config(replace(config, train=replace(config.train, init_from=str(init))), root / "recipe.yaml")
    return {"params": sum(p.numel() for p in model.parameters()),
            "vocab": model.llm.get_output_embeddings().weight.shape[0], "tokenizer": len(tokenizer),
            "frozen": sum(p.numel() for n, p in model.named_parameters() if model.part_of(n) == "encoder")}


def load_run(root: Path):
    """(run config, its stage, fusionlm model from the init checkpoint, tokenizer, source, the
    stage's MixtureBatches): what the transformers arms encode their samples with."""
    from fusionlm.checkpoint import load_model
    from fusionlm.config import load_config
    from fusionlm.data.batching.batches import MixtureBatches
    from fusionlm.data.pixels.processing import ImageSpec
    from fusionlm.data.prompt import PromptEncoder
    from fusionlm.data.sources import build_source

    config = load_config(root / "recipe.yaml")
    (stage,) = config.stages
    model, tokenizer, _ = load_model(root / "init")
    source = build_source(config.data)
    spec = ImageSpec.for_model(model, config, root=source.root)
    # as fusionlm.train.loop.Trainer._batches builds it, for stage 0 on one process (which samples
    # a step holds does not depend on how they are collated)
    data = MixtureBatches(source, stage.mixture, seed=config.train.seed, stage=0, batch_size=stage.batch_size,
                          prompts=PromptEncoder.of(model, tokenizer, spec), grad_accum=stage.grad_accum,
                          condition_dropout=stage.condition_dropout)
    if stage.grad_accum != 1:
        raise SystemExit("this benchmark compares steps of one micro-batch (grad_accum 1)")
    return config, stage, model, tokenizer, source, data


def step_samples(data, k: int) -> list[dict]:
    """The samples of step ``k`` as fusionlm's ``MixtureBatches.__getitem__`` encodes them, the
    ones it skips skipped: each {input_ids, labels, pixel_values (I, 3, H, W) or None, id}."""
    from fusionlm.errors import FusionError  # SkipSample and ImageError are FusionErrors

    out = []
    for number in range(k * data.batch_size, (k + 1) * data.batch_size):
        try:
            sample = data.sample_at(number)
            prompted = data.prompts.sample(sample)
        except FusionError:
            continue
        if any(inp.role != "image" or inp.pixels.dim() != 3 for inp in prompted.inputs):
            raise SystemExit("LLaVA takes whole images: no tiles, frames or patch lists")
        pixels = torch.stack([inp.pixels for inp in prompted.inputs]) if prompted.inputs else None
        out.append({"input_ids": list(prompted.encoded.input_ids), "labels": list(prompted.encoded.labels),
                    "pixel_values": pixels, "id": prompted.encoded.sample_id})
    return out


def targets(sample: dict) -> int:
    return sum(t != -100 for t in sample["labels"][1:])


# ----------------------------------------------------------------------------- transformers' side


def _pixels(samples: list[dict]) -> dict:
    shown = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    return {"pixel_values": torch.cat(shown)} if shown else {}


class Padded:
    """The usual collator: pad to the batch's longest (right), stack the pixels."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples: list[dict]) -> dict:
        from torch.nn.utils.rnn import pad_sequence

        ids = [torch.tensor(s["input_ids"]) for s in samples]
        return {"input_ids": pad_sequence(ids, batch_first=True, padding_value=self.pad_id),
                "labels": pad_sequence([torch.tensor(s["labels"]) for s in samples], batch_first=True,
                                       padding_value=-100),
                "attention_mask": pad_sequence([torch.ones(len(i), dtype=torch.long) for i in ids], batch_first=True),
                **_pixels(samples)}


class Flattened:
    """transformers' padding-free ``DataCollatorWithFlattening``, the pixels concatenated alongside."""

    def __init__(self):
        from transformers.data.data_collator import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening()

    def __call__(self, samples: list[dict]) -> dict:
        batch = self.flatten([{"input_ids": s["input_ids"], "labels": s["labels"]} for s in samples])
        return {**batch, **_pixels(samples)}


class Steps(torch.utils.data.Dataset):
    """Item k: step k's samples, encoded when asked (as fusionlm's loop does), collated."""

    def __init__(self, data, steps: int, collate):
        self.data, self.steps, self.collate = data, steps, collate

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, k: int) -> dict:
        return self.collate(step_samples(self.data, k))


def first(items: list[dict]) -> dict:
    return items[0]  # the DataLoader's batch of one item: that step's collated batch


def llava(root: Path, stage):
    """The exported LLaVA as it trains: the vision tower frozen (the stage trains connector + llm),
    ``use_cache`` off (see ``parity``: with it on, a flattened batch's samples attend to each other)."""
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(root / "llava")
    hf.config.text_config.use_cache = False
    if sorted(stage.train) != ["connector", "llm"]:
        raise SystemExit(f"the stage trains {stage.train}; this benchmark freezes the tower alone")
    for p in hf.model.vision_tower.parameters():
        p.requires_grad_(False)
    return hf


def run_transformers(root: Path, arm: str) -> dict:
    import transformers
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from fusionlm.train.schedule import lr_lambda

    config, stage, model, tokenizer, _, data = load_run(root)
    del model  # only its prompt encoder was needed
    hf = llava(root, stage)
    collate = Padded(tokenizer.pad_token_id) if arm == "padded" else Flattened()
    workers = config.data.loader_workers

    class Trainer(transformers.Trainer):
        def get_train_dataloader(self):  # step k is fusionlm's step k: in order, no shuffling
            loader = torch.utils.data.DataLoader(
                self.train_dataset, batch_size=1, shuffle=False, collate_fn=first, num_workers=workers,
                prefetch_factor=4 if workers else None)
            return self.accelerator.prepare(loader)

        def create_scheduler(self, num_training_steps, optimizer=None):  # fusionlm's schedule
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, lr_lambda(stage))
                self._created_lr_scheduler = True
            return self.lr_scheduler

    out = Path(tempfile.mkdtemp(prefix=f"e2e-{arm}-"))
    args = TrainingArguments(
        output_dir=str(out), max_steps=stage.steps, per_device_train_batch_size=stage.batch_size,
        learning_rate=stage.lr, weight_decay=stage.weight_decay, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        max_grad_norm=config.train.grad_clip or math.inf, logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True,
        seed=config.train.seed, dataloader_num_workers=workers, remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=hf, args=args, train_dataset=Steps(data, stage.steps, collate), data_collator=collate)
    trainer.remove_callback(PrinterCallback)  # no per-step printing
    ends: list[float] = []

    class StepEnds(transformers.TrainerCallback):
        def on_step_end(self, *args, **kw):
            ends.append(time.perf_counter())

    trainer.add_callback(StepEnds())
    cpu = cpu_s()
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    cpu = sum(b - a for a, b in zip(cpu, cpu_s()))
    shutil.rmtree(out, ignore_errors=True)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    steps = [b - a for a, b in zip([started] + ends, ends)]  # the first: from train()'s start
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    name = f"{type(opt).__module__}.{type(opt).__name__}, fused={opt.defaults.get('fused')}"
    return {"wall_s": wall, "cpu_s": cpu, "losses": losses, "steps_s": steps, "optimizer": name}


# ----------------------------------------------------------------------------- fusionlm's side


def run_fusionlm(root: Path) -> dict:
    from fusionlm.config import load_config
    from fusionlm.train.loop import Trainer

    class Timed(Trainer):
        ended: float | None = None

        def save(self, *args, **kw):  # the end-of-stage checkpoint: training is over
            if self.ended is None:
                self.ended, self.cpu_end = time.perf_counter(), time.process_time()
            return super().save(*args, **kw)

    out = Path(tempfile.mkdtemp(prefix="e2e-fusionlm-"))
    trainer = Timed(load_config(root / "recipe.yaml"), out, log=quiet)
    cpu = cpu_s()
    started = time.perf_counter()
    trainer.run()
    whole = time.perf_counter() - started
    # this process up to the checkpoint save; its DataLoader workers, ended by the end of run()
    cpu = trainer.cpu_end - cpu[0] + cpu_s()[1] - cpu[1]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": trainer.ended - started, "cpu_s": cpu, "run_s": whole, "losses": [r["loss"] for r in rows],
            "tokens": [r["tokens"] for r in rows], "steps_s": [r["tokens"] / r["tokens_per_s"] for r in rows],
            "pack": trainer.config.data.pack}


# ----------------------------------------------------------------------------- checks before timing


def parity(root: Path, samples: list[list[dict]]) -> dict:
    """Same weights, same data, same losses at the start; returns the numbers (asserted)."""
    from fusionlm.interop.formats import FORMATS
    from fusionlm.train.loop import Trainer
    from fusionlm.train.objectives import objective_for

    config, stage, _, tokenizer, _, _ = load_run(root)
    out = Path(tempfile.mkdtemp(prefix="e2e-parity-"))
    trainer = Trainer(config, out, log=quiet)  # the model fusionlm trains, from train.init_from
    ours = trainer.model.eval()
    hf = llava(root, stage).eval()
    theirs = FORMATS.get("llava").to_theirs(ours.state_dict())
    expected = hf.state_dict()
    assert set(theirs) == set(expected), set(theirs) ^ set(expected)
    weights = max(float((theirs[k].float() - expected[k].float()).abs().max()) for k in expected)
    assert weights == 0.0, f"weights differ by {weights}"
    assert hf.config.image_token_id == ours.ids.image and hf.config.image_seq_length == ours.tokens_per_image
    assert hf.config.text_config.vocab_size == ours.llm.get_output_embeddings().weight.shape[0]
    facts = {"weights": weights, "image_token": ours.ids.image, "image_tokens": ours.tokens_per_image}
    from fusionlm.train.stages import apply_trainable

    trains = sum(p.numel() for p in apply_trainable(ours, stage.train, log=quiet))  # as the loop does
    assert trains == sum(p.numel() for p in hf.parameters() if p.requires_grad), "other weights train"

    # the data: each step's samples, real and target tokens, as fusionlm's loop collates them
    objective = objective_for(stage)
    batches = trainer._batches(0, stage, 0)
    positions = padded_positions = rows = 0
    packed = False
    own = None
    for k, mine in enumerate(samples):
        batch = next(batches)
        # (packing may put them in another order: the step's loss is a sum over them)
        assert sorted(batch.sample_ids) == sorted(s["id"] for s in mine), f"step {k}: other samples"
        assert batch.num_tokens == sum(len(s["input_ids"]) for s in mine), f"step {k}: other tokens"
        assert objective.items(batch) == sum(map(targets, mine)), f"step {k}: other targets"
        positions += batch.input_ids.numel()
        rows += batch.input_ids.shape[0]
        packed = packed or batch.segments is not None
        padded_positions += len(mine) * max(len(s["input_ids"]) for s in mine)
        if k == 0:
            own = batch
    del batches
    facts.update(positions=positions, padded_positions=padded_positions, rows=rows, packed=packed,
                 pack=trainer.config.data.pack)

    # the losses at the start weights, on step 0
    padded, flat = Padded(tokenizer.pad_token_id)(samples[0]), Flattened()(samples[0])
    hf.train()  # as it trains (no dropout: train and eval agree)
    with torch.no_grad():
        l_padded = float(hf(**padded).loss)
        l_flat = float(hf(**flat).loss)  # use_cache off, as the arms run it
        hf.config.text_config.use_cache = True  # transformers' default
        l_flat_cache = float(hf(**flat).loss)
        hf.config.text_config.use_cache = False
        ours.train()
        l_ours = float(ours(padded["input_ids"], attention_mask=padded["attention_mask"],
                            pixel_values=padded.get("pixel_values"), labels=padded["labels"]).loss)
        part = objective.loss(ours, own).shown  # the loop's own batch (packed or not), summed
        l_own = float(part) / objective.items(own)
    facts.update(loss=l_padded, ours_vs_llava=abs(l_ours - l_padded), own_batch_vs_llava=abs(l_own - l_padded),
                 flat_vs_padded=abs(l_flat - l_padded), flat_with_cache_vs_padded=abs(l_flat_cache - l_padded))
    for key in ("ours_vs_llava", "own_batch_vs_llava", "flat_vs_padded"):
        assert facts[key] < TOLERANCE, f"{key}: {facts[key]:.2e}"
    facts["trainer"], facts["hf"], facts["objective"] = trainer, hf, objective
    shutil.rmtree(out, ignore_errors=True)
    return facts


def flops(facts: dict, samples: list[list[dict]], steps: int) -> dict:
    """FLOPs of forward + backward: fusionlm's on its first ``steps`` batches (as its loop computes
    them), and each transformers arm's on step 0."""
    from torch.utils.flop_counter import FlopCounterMode

    from fusionlm.info import count_cpu_attention
    from fusionlm.train.stages import apply_trainable

    trainer, hf, objective = facts["trainer"], facts["hf"], facts["objective"]
    (stage,) = trainer.config.stages
    count_cpu_attention()
    model = trainer.model.train()
    apply_trainable(model, stage.train, log=quiet)
    batches = trainer._batches(0, stage, 0)
    total = tokens = 0
    out = {"counted_steps": steps}
    for k in range(steps):
        batch = next(batches)
        with FlopCounterMode(display=False) as counter:
            objective.loss(model, batch).train.backward()
        model.zero_grad(set_to_none=True)
        total, tokens = total + counter.get_total_flops(), tokens + batch.num_tokens
        if k == 0:
            out["fusionlm_step0_per_token"] = counter.get_total_flops() / batch.num_tokens
    del batches
    out["fusionlm_per_token"] = total / tokens
    hf.train()
    n0 = sum(len(s["input_ids"]) for s in samples[0])
    for arm, collate in (("padded", Padded(trainer.tokenizer.pad_token_id)), ("flattened", Flattened())):
        with FlopCounterMode(display=False) as counter:
            hf(**collate(samples[0])).loss.backward()
        hf.zero_grad(set_to_none=True)
        out[f"{arm}_per_token"] = counter.get_total_flops() / n0
    return out


def adamw_ms(facts: dict) -> tuple[float, float]:
    """ms of one AdamW step on the stage's trainable weights: torch's default implementation and the
    fused one (what fusionlm's loop builds on CPU and CUDA, and transformers' default, ``adamw_torch_fused``)."""
    from fusionlm.train.stages import apply_trainable

    trainer = facts["trainer"]
    (stage,) = trainer.config.stages
    params = apply_trainable(trainer.model, stage.train, log=quiet)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    plain = torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.95), weight_decay=stage.weight_decay)
    fused = torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.95), weight_decay=stage.weight_decay, fused=True)
    times = timed_alternately(plain.step, fused.step, repeats=3, warmup=1)
    trainer.model.zero_grad(set_to_none=True)
    return times[0] * 1000, times[1] * 1000


def matmul_peak() -> float:
    """The best FLOP/s of fp32 1024³ and 2048³ matrix products, timed in turn."""
    pairs = {n: (torch.randn(n, n), torch.randn(n, n)) for n in (1024, 2048)}
    times = timed_alternately(*(lambda a=a, b=b: a @ b for a, b in pairs.values()), repeats=5, warmup=1)
    return max(2 * n**3 / t for n, t in zip(pairs, times))


# ----------------------------------------------------------------------------- the benchmark


def arm_process(arm: str, root: Path, out: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--arm", arm, "--setup", str(root), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"arm {arm} failed ({done.returncode})")
    return json.loads(out.read_text())


def spread(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:.1f} ({min(values):.1f}–{max(values):.1f})" if len(values) > 1 else f"{med:.1f}"


def bench(name: str, steps: int, rounds: int, root: Path) -> str:
    print(f"\n## {name}: setting up", flush=True)
    root.mkdir(parents=True)
    model = setup(name, steps, root)
    config, stage, _, _, _, data = load_run(root)
    started = time.perf_counter()
    samples = [step_samples(data, k) for k in range(steps)]
    encode_s = time.perf_counter() - started
    n_samples = sum(map(len, samples))
    skipped = steps * stage.batch_size - n_samples
    tokens = sum(len(s["input_ids"]) for step in samples for s in step)
    facts = parity(root, samples)
    counted = flops(facts, samples, min(3, steps)) if name == "smollm" else None
    opt_plain, opt_fused = adamw_ms(facts)
    trainable = model["params"] - model["frozen"]
    del facts["trainer"], facts["hf"], facts["objective"]

    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    peaks = []
    for r in range(rounds):
        for arm in ARMS:
            res = arm_process(arm, root, root / f"{arm}-{r}.json")
            results[arm].append(res)
            print(f"  round {r + 1}/{rounds} {arm}: {res['wall_s']:.1f} s", flush=True)
        if name == "smollm":
            peaks.append(matmul_peak())
    ours = results["fusionlm"][0]
    per_step = [sum(len(s["input_ids"]) for s in step) for step in samples]
    assert ours["tokens"] == per_step, "fusionlm's logged tokens differ from the samples'"

    lines = [f"### {name}",
             f"machine: {machine()}",
             f"model: {model['params']:,} parameters ({model['frozen']:,} of them the frozen encoder), "
             f"LLM {dict(SMOLLM) if name == 'smollm' else 'of the demo recipe'}, vocabulary {model['vocab']:,} "
             f"(tokenizer {model['tokenizer']}); stage `instruct`: batch {stage.batch_size}, {steps} steps, "
             f"warmup {stage.warmup_steps}, lr {stage.lr:g}, grad_clip 1.0, AdamW betas (0.9, 0.95) "
             f"[transformers: {results['padded'][0]['optimizer']}]",
             f"data: {n_samples} samples ({skipped} skipped on every side), {tokens:,} real tokens; positions "
             f"computed: fusionlm {facts['positions']:,} in {facts['rows']} rows ({'packed' if facts['packed'] else 'one sample per row'}: "
             f"its default, data.pack={facts['pack']}), padded arm {facts['padded_positions']:,} in {n_samples} rows, flattened arm {tokens:,}; pre-encoding them alone took {encode_s:.1f} s "
             f"(inside every arm's timed run, in {config.data.loader_workers} DataLoader worker(s))",
             f"parity at the start weights (step 0): weights max|Δ| {facts['weights']:.1f}; loss {facts['loss']:.6f}: "
             f"fusionlm vs LLaVA on the padded batch |Δ| {facts['ours_vs_llava']:.1e}, fusionlm's own batch "
             f"{facts['own_batch_vs_llava']:.1e}, flattened vs padded {facts['flat_vs_padded']:.1e} "
             f"(with transformers' default use_cache=True: {facts['flat_with_cache_vs_padded']:.1e}, the samples "
             f"attend to each other); image token id {facts['image_token']}, {facts['image_tokens']} tokens per image",
             ""]
    rows = []
    walls = {arm: [r["wall_s"] for r in results[arm]] for arm in ARMS}
    med = {arm: statistics.median(w) for arm, w in walls.items()}
    base = results["padded"][0]["losses"]
    cpus = {arm: [r["cpu_s"] for r in results[arm]] for arm in ARMS}
    for arm in ARMS:
        losses = results[arm][0]["losses"]
        delta = max(abs(a - b) for a, b in zip(losses, base))
        paired = [p["wall_s"] / f["wall_s"] for p, f in zip(results[arm], results["fusionlm"])]  # per round
        ratio = "1.00×" if arm == "fusionlm" else \
            f"**{med[arm] / med['fusionlm']:.2f}×**" + (f" ({min(paired):.2f}–{max(paired):.2f})" if rounds > 1 else "")
        cpu_ratio = statistics.median(cpus[arm]) / statistics.median(cpus["fusionlm"])
        later = statistics.median(statistics.mean(r["steps_s"][1:] or r["steps_s"]) for r in results[arm])
        rows.append(f"| {arm} | {spread(walls[arm])} | {spread(cpus[arm])} | {later:.2f} | {tokens / med[arm]:,.0f} | "
                    f"{ratio} | {cpu_ratio:.2f}× | {losses[0]:.4f} | {losses[-1]:.4f} | "
                    f"{'—' if arm == 'padded' else f'{delta:.1e}'} |")
    header = ["arm", f"wall s, median of {rounds} (min–max)", "CPU s (min–max)", "s/step after the 1st",
              "real tokens/s", "fusionlm speed-up, wall (per round)", "in CPU s", "first loss", "last loss",
              "max \\|Δ loss\\| vs padded"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| --- |" + " ---: |" * (len(header) - 1))
    lines.extend(rows)
    rerun = max(max(abs(a - b) for a, b in zip(r["losses"], results[arm][0]["losses"]))
                for arm in ARMS for r in results[arm])
    lines.append("")
    gaps = [abs(a - b) for a, b in zip(ours["losses"], base)]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    peers = max(abs(a - b) for a, b in zip(results["flattened"][0]["losses"], base))
    lines.append(f"loss curves over {steps} steps: fusionlm vs padded max|Δ| {gaps[worst]:.1e} (at step {worst + 1}; "
                 f"the two transformers arms, same optimizer, differ by up to {peers:.1e}: rounding differences "
                 f"that training amplifies); the same arm across rounds max|Δ| "
                 f"{rerun:.1e}; fusionlm's whole run() incl. its final checkpoint and loss plot "
                 f"{statistics.median(r['run_s'] for r in results['fusionlm']):.1f} s")
    lines.append(f"one AdamW step on the {trainable:,} trainable weights (timed in turn, in the parent process): "
                 f"torch's default implementation {opt_plain:.0f} ms; fused (what fusionlm's loop builds "
                 f"on CPU and CUDA, and transformers' default optim `adamw_torch_fused`) {opt_fused:.0f} ms")
    if counted is not None:
        peak = max(peaks)
        achieved = counted["fusionlm_per_token"] * tokens / med["fusionlm"]
        lines.append(f"FLOPs (FlopCounterMode, forward + backward, attention included): fusionlm "
                     f"{counted['fusionlm_per_token'] / 1e6:.1f} MFLOP per real token over its first "
                     f"{counted['counted_steps']} steps; on step 0: fusionlm {counted['fusionlm_step0_per_token'] / 1e6:.1f}, "
                     f"padded arm {counted['padded_per_token'] / 1e6:.1f}, flattened arm "
                     f"{counted['flattened_per_token'] / 1e6:.1f} MFLOP per real token")
        steady = statistics.median(counted["fusionlm_per_token"] * sum(r["tokens"][1:]) / sum(r["steps_s"][1:])
                                   for r in results["fusionlm"])
        lines.append(f"fusionlm achieved {achieved / 1e9:.1f} GFLOP/s over its timed run = {achieved / peak:.0%} of the "
                     f"peak {peak / 1e9:.0f} GFLOP/s (best of fp32 1024³ and 2048³ matmuls, timed in turn after each "
                     f"round); over its steps after the first {steady / 1e9:.1f} GFLOP/s = {steady / peak:.0%}")
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=["demo", "smollm", "both"], default="both")
    parser.add_argument("--steps", type=int, help="steps per arm (default: demo 40, smollm 20)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of A B C, each arm a fresh process")
    parser.add_argument("--quick", action="store_true", help="4 steps, 1 round: to check the script")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--setup", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:  # one timed arm, in its own process
        res = run_fusionlm(args.setup) if args.arm == "fusionlm" else run_transformers(args.setup, args.arm)
        args.out.write_text(json.dumps(res))
        return
    if args.quick:
        args.steps, args.rounds = args.steps or 4, 1
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated")
    root = Path(tempfile.mkdtemp(prefix="e2e-bench-"))
    try:
        for name in (["demo", "smollm"] if args.config == "both" else [args.config]):
            bench(name, args.steps or CONFIGS[name]["steps"], args.rounds, root / name)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
