"""Shared by the benchmark scripts: a LLaVA-shaped checkpoint both fusionlm and transformers load,
timing with warm-up, and the machine's practical matmul limit."""

from __future__ import annotations

import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def llava_pair(hidden: int = 256, layers: int = 4, image_size: int = 64, patch: int = 8, *,
               init_std: float | None = None, chat_template: str | None = None):
    """(transformers LLaVA, its processor, fusionlm's import of it, tokenizer, config, checkpoint dir).
    ``init_std``: the LLM's random init (transformers' 0.02 by default); ``chat_template``: the
    processor's and tokenizer's, in place of the tiny test checkpoint's."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from fusionlm.checkpoint import load_model
    from fusionlm.interop import import_checkpoint
    from hf_tiny import llava_checkpoint

    root = Path(tempfile.mkdtemp())
    src = llava_checkpoint(root / "src", image_size=image_size)
    # widen the tiny test checkpoint to the benchmark's size
    from transformers import LlavaConfig

    config = LlavaConfig.from_pretrained(src)
    config.text_config.hidden_size, config.text_config.intermediate_size = hidden, 4 * hidden
    config.text_config.num_hidden_layers, config.text_config.num_attention_heads = layers, hidden // 32
    config.text_config.num_key_value_heads = hidden // 64
    config.vision_config.patch_size = patch
    if init_std is not None:
        config.text_config.initializer_range = init_std
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(src)
    processor = LlavaProcessor.from_pretrained(src, backend="pil")
    processor.patch_size = patch
    if chat_template is not None:
        processor.chat_template = processor.tokenizer.chat_template = chat_template
    processor.save_pretrained(src)
    ours = import_checkpoint(str(src), root / "ours", log=lambda *_: None)
    model, tokenizer, cfg = load_model(ours)
    hf = LlavaForConditionalGeneration.from_pretrained(src).eval()
    return hf, LlavaProcessor.from_pretrained(src, backend="pil"), model, tokenizer, cfg, src


def mllama_pair(hidden: int = 256, layers: int = 5, cross_layers: tuple[int, ...] = (1, 3)):
    """(transformers Mllama, its processor, fusionlm's import of it, tokenizer, config, checkpoint dir):
    the tests' tiny Llama 3.2 Vision (16-pixel tiles, up to 4 of them) with its text model widened
    as ``llava_pair``'s; ``layers`` counts the cross-attention layers."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor

    from fusionlm.checkpoint import load_model
    from fusionlm.interop import import_checkpoint
    from hf_tiny_mllama import mllama_checkpoint

    root = Path(tempfile.mkdtemp())
    src = mllama_checkpoint(root / "src", cross_layers=cross_layers)
    config = MllamaConfig.from_pretrained(src)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = hidden, 4 * hidden, layers
    text.num_attention_heads, text.num_key_value_heads = hidden // 32, hidden // 64
    torch.manual_seed(0)
    hf = MllamaForConditionalGeneration(config)
    with torch.no_grad():  # as the helper: fresh gates are 0 and would switch the image path off
        for name, p in hf.named_parameters():
            if "gate" in name:
                p.uniform_(0.5, 1.0)
    hf.save_pretrained(src)
    ours = import_checkpoint(str(src), root / "ours", log=lambda *_: None)
    model, tokenizer, cfg = load_model(ours)
    hf = MllamaForConditionalGeneration.from_pretrained(src).eval()
    return hf, MllamaProcessor.from_pretrained(src, backend="pil"), model, tokenizer, cfg, src


def janus_pair(width: int = 256, layers: int = 4, image_size: int = 128):
    """(transformers Janus loaded from fusionlm's export, its processor, fusionlm's model, tokenizer,
    config): the tests' tiny Janus widened, imported, then exported again, so both sides run the
    same weights and the transformers side reads what ``fusionlm export`` writes. At 128 px the
    tower reads, and the VQ model draws, 16 x 16 = 256 codes."""
    from transformers import JanusForConditionalGeneration, JanusProcessor

    from fusionlm.checkpoint import load_model
    from fusionlm.interop import export_checkpoint, import_checkpoint
    from hf_tiny import janus_checkpoint

    root = Path(tempfile.mkdtemp())
    src = janus_checkpoint(root / "src", image_size=image_size, width=width, layers=layers)
    ours = import_checkpoint(str(src), root / "ours", log=lambda *_: None)
    exported = export_checkpoint(ours, root / "exported", "janus", log=lambda *_: None)
    model, tokenizer, cfg = load_model(ours)
    hf = JanusForConditionalGeneration.from_pretrained(exported).eval()
    return hf, JanusProcessor.from_pretrained(exported, backend="pil"), model, tokenizer, cfg


def print_table(header: list[str], aligns: str, rows: list[str]) -> None:
    """A markdown table: ``aligns`` one letter per column, ``r`` right-aligned (numbers), ``l`` left."""
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---:" if a == "r" else "---" for a in aligns) + " |")
    print("\n".join(rows))


def timed(fn, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def timed_alternately(*fns, repeats: int = 7, warmup: int = 2) -> list[float]:
    """Median seconds of each of ``fns``, timed in turn (one call of each per round) so that the
    machine's drift (other tenants, clock changes) falls on all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            started = time.perf_counter()
            fn()
            out.append(time.perf_counter() - started)
    return [statistics.median(t) for t in times]


def matmul_flops(n: int = 1024, dtype=torch.float32) -> float:
    """FLOP/s of an n×n×n matrix product: the machine's practical limit for dense work."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds = timed(lambda: a @ b, repeats=10)
    return 2 * n**3 / seconds


def train_pair(model, hf, inputs: dict, pixels, labels: torch.Tensor):
    """Training copies of fusionlm's model and transformers' on one batch: (``train_table``'s pairs,
    |loss difference| of the two, FLOPs of one forward + backward, attention products included)."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    from fusionlm.info import count_cpu_attention

    ours_model, hf_model = copy.deepcopy(model).train(), copy.deepcopy(hf).train()
    ours_fwd = lambda: ours_model(inputs["input_ids"], attention_mask=inputs["attention_mask"],  # noqa: E731
                                  pixel_values=pixels, labels=labels).loss
    hf_fwd = lambda: hf_model(**inputs, labels=labels).loss  # noqa: E731
    with torch.no_grad():
        agree = abs(float(ours_fwd()) - float(hf_fwd()))
    count_cpu_attention()  # else the attention products count 0 FLOPs on CPU
    with FlopCounterMode(display=False) as counter:
        ours_fwd().backward()
    ours_model.zero_grad(set_to_none=True)
    from fusionlm.llm import decoder_layers

    compiled_model = copy.deepcopy(model).train()  # train.compile: each decoder layer through torch.compile
    for layer in decoder_layers(compiled_model.llm):
        layer.compile()
    compiled_fwd = lambda: compiled_model(inputs["input_ids"], attention_mask=inputs["attention_mask"],  # noqa: E731
                                          pixel_values=pixels, labels=labels).loss
    with torch.no_grad():
        agree = max(agree, abs(float(compiled_fwd()) - float(hf_fwd())))
    pairs = {"fusionlm": (ours_model, ours_fwd), "compiled": (compiled_model, compiled_fwd),
             "transformers": (hf_model, hf_fwd)}
    return pairs, agree, counter.get_total_flops()


def train_table(pairs: dict, tokens: int, step_flops: float, peak: float | None = None) -> None:
    """The training-step table: ``pairs`` maps "fusionlm", "compiled" (its decoder layers through
    torch.compile) and "transformers" to (module, forward returning the loss); each row times forward + backward + AdamW on both, in turn with a
    1024³ matmul, whose FLOP/s (the machine's practical peak at that moment) the % column divides by."""
    print("| precision | fusionlm step ms | transformers step ms | ratio | fusionlm tokens/s | fusionlm GFLOP/s "
          "(% of matmul peak) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, bf16, ours in (("fp32", False, "fusionlm"), ("fp32, `train.compile`", False, "compiled"),
                             ("bf16 autocast", True, "fusionlm")):
        def run(model, forward):
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

            def go():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    forward().backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            return go
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        mm_s, ours_s, hf_s = timed_alternately(lambda: a @ b, run(*pairs[ours]), run(*pairs["transformers"]))
        peak = 2 * 1024**3 / mm_s
        achieved = step_flops / ours_s
        print(f"| {name} | {ours_s * 1000:.1f} | {hf_s * 1000:.1f} | {hf_s / ours_s:.2f}x | {tokens / ours_s:,.0f} | "
              f"{achieved / 1e9:.1f} ({achieved / peak:.0%} of {peak / 1e9:.0f}) |")
