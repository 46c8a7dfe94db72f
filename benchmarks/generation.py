"""Generation: time to first token and decode tokens/s, fusionlm vs transformers' generate, on the
same imported LLaVA-shaped model and the same prompts; the generated tokens must agree.

    python benchmarks/generation.py
"""

from __future__ import annotations

import statistics
import time

import torch

from common import llava_pair, machine
from fusionlm.data.pixels.processing import ImageSpec
from fusionlm.generate import Request, generate_ids

NEW = 32
REPEATS = 5


def no_end(model_logits_module, end: int):
    never = torch.tensor([end])
    return model_logits_module.register_forward_hook(lambda m, a, out: out.index_fill(-1, never, float("-inf")))


def main() -> None:
    torch.manual_seed(0)
    hf, processor, model, tokenizer, config, _ = llava_pair()
    spec = ImageSpec.for_model(model, config)
    from hf_tiny import noise_images
    from test_interop_llava import chat_text

    # neither side may stop early: the end token is banned on both
    handles = [no_end(model.llm.lm_head, model.ids.end), no_end(hf.lm_head, model.ids.end)]
    print(f"machine: {machine()}; new tokens per request: {NEW}")
    rows = []
    for batch in (1, 8):
        images = noise_images([(48 + 8 * i, 40) for i in range(batch)], seed=1)
        prompts = ["<image>\nWhat colour is the shape?" if i % 2 == 0 else "<image>\nDescribe the picture."
                   for i in range(batch)]
        reqs = [Request(p, [img]) for p, img in zip(prompts, images)]
        texts = [chat_text(tokenizer, p) for p in prompts]
        inputs = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")

        def ours(n):  # request -> tokens: image loading and preprocessing, tokenizing, prefill, decoding
            return generate_ids(model, tokenizer, reqs, spec, max_new_tokens=n)

        def ours_compiled(n):  # the same, the decoding step through torch.compile (compiled in the warm-up)
            return generate_ids(model, tokenizer, reqs, spec, max_new_tokens=n, compile=True)

        def theirs(n):  # the same, through the checkpoint's processor and generate
            batch_inputs = processor(text=texts, images=images, padding=True, padding_side="left",
                                     return_tensors="pt")
            return hf.generate(**batch_inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=model.ids.pad, suppress_tokens=[model.ids.image])

        sides = {"ours": ours, "compiled": ours_compiled, "theirs": theirs}
        for name, fn in sides.items():
            t0 = time.perf_counter(); fn(NEW); warm = time.perf_counter() - t0  # warm up (compiles)
            if name == "compiled":
                print(f"batch {batch}: first compiled request {warm:.1f} s (compilation included)")
        runs = {name: ([], []) for name in sides}
        outs = {}
        for _ in range(REPEATS):  # the three sides in turn, so the machine's drift falls on all alike
            for name, fn in sides.items():
                t0 = time.perf_counter(); fn(1); runs[name][0].append(time.perf_counter() - t0)
                t0 = time.perf_counter(); outs[name] = fn(NEW); runs[name][1].append(time.perf_counter() - t0)
        results = {}
        for name, (firsts, totals) in runs.items():
            ttft, total = statistics.median(firsts), statistics.median(totals)
            results[name] = (ttft, batch * (NEW - 1) / max(1e-9, total - ttft), outs[name])
        agree = results["ours"][2] == results["compiled"][2] == [
            row[inputs["input_ids"].shape[1]:].tolist() for row in results["theirs"][2]]
        (ot, od, _), (_, cd, _), (tt, td, _) = results["ours"], results["compiled"], results["theirs"]
        rows.append(f"| {batch} | {ot * 1000:.1f} | {tt * 1000:.1f} | {od:.0f} | {cd:.0f} | {td:.0f} | {od / td:.2f}x | "
                    f"{cd / td:.2f}x | {agree} |")
    print("| batch | fusionlm TTFT ms | transformers TTFT ms | fusionlm decode tok/s | fusionlm compiled decode tok/s | "
          "transformers decode tok/s | decode ratio | compiled ratio | tokens agree |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    print("\n".join(rows))
    for h in handles:
        h.remove()


if __name__ == "__main__":
    main()
