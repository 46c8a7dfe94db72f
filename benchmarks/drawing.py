"""Drawing: pictures per second, fusionlm's ``draw_codes`` vs transformers'
``JanusForConditionalGeneration.generate(generation_mode="image")``, on the same exported Janus,
the same prompts, the same number of codes and the same guidance; the codes must agree.

Both sides decode greedily (so their codes can be compared), under guidance (each prompt's
padded null row in the same batch), from request to codes: tokenizing, prefill and one step per
code. Decoding codes to pixels is the same VQ module on both sides and is left out.

    python benchmarks/drawing.py
"""

from __future__ import annotations

import torch

from common import janus_pair, machine, print_table, timed_alternately
from fusionlm.draw import DrawRequest, Sampling, draw_codes

PROMPTS = ["a large red circle in the top left", "two blue squares", "a green triangle left of a red circle",
           "a small yellow square", "three purple circles", "an orange triangle at the bottom"]
CFG = 5.0


def main() -> None:
    torch.manual_seed(0)
    hf, processor, model, tokenizer, config = janus_pair()
    codes = model.image_tokenizer.grid[0] * model.image_tokenizer.grid[1]
    print(f"machine: {machine()}; codes per picture: {codes}; guidance {CFG}; LLM "
          f"{model.llm.config.hidden_size} wide, {model.llm.config.num_hidden_layers} layers")
    sampling = Sampling(cfg=CFG, temperature=0)
    rows = []
    for batch in (1, 4):
        prompts = PROMPTS[:batch]

        def chat(p):
            return tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True)

        def ours():
            return draw_codes(model, tokenizer, [DrawRequest(p) for p in prompts], sampling=sampling).flatten(1)

        def compiled():  # the decoding step through torch.compile (compiled in the first call)
            return draw_codes(model, tokenizer, [DrawRequest(p) for p in prompts], sampling=sampling,
                              compile=True).flatten(1)

        def theirs():
            inputs = processor(text=[chat(p) for p in prompts], generation_mode="image", padding=True,
                               return_tensors="pt")
            return hf.generate(**inputs, generation_mode="image", do_sample=False, guidance_scale=CFG)

        agree = torch.equal(ours(), theirs()) and torch.equal(ours(), compiled())
        t_ours, t_compiled, t_theirs = timed_alternately(ours, compiled, theirs, repeats=5, warmup=1)
        rows.append(f"| {batch} | {t_ours:.2f} | {t_compiled:.2f} | {t_theirs:.2f} | {batch * codes / t_ours:.0f} | "
                    f"{batch * codes / t_theirs:.0f} | **{t_theirs / t_ours:.2f}x** | {t_theirs / t_compiled:.2f}x | "
                    f"{agree} |")
    print_table(["pictures per batch", "fusionlm s", "fusionlm compiled s", "transformers s", "fusionlm codes/s",
                 "transformers codes/s", "ratio", "compiled ratio", "codes agree"], "rrrrrrrrl", rows)


if __name__ == "__main__":
    main()
