"""An lmms-eval model adapter: evaluate a fusionlm checkpoint on lmms-eval's benchmarks.

lmms-eval (``pip install 'fusionlm[lmms]'``, version 0.7.3) runs the field's benchmarks (MMMU,
MMBench, ChartQA, DocVQA, …) against any model class it can find by name. This module gives it
one, named ``fusionlm``::

    python -m fusionlm.evaluate.lmms --model fusionlm \\
        --model_args pretrained=runs/x,device=auto,batch_size=8 --tasks chartqa --output_path results/

(the same arguments as ``lmms-eval``; this entry point only registers the model first). From
Python, ``simple_evaluate(model=FusionLMEval(pretrained="runs/x"), tasks=["chartqa"])`` works too.

What the adapter does with each kind of lmms-eval request:

* ``generate_until`` (context, gen_kwargs, doc_to_visual, doc_id, task, split): the context and
  the document's visuals become one fusionlm ``Request`` (``to_request``), answered by fusionlm's
  own ``generate`` with the request's ``max_new_tokens`` / ``temperature`` / ``top_p`` (greedy
  unless ``do_sample`` or a positive temperature asks otherwise); the decoded answer is cut at the
  first of the ``until`` stop strings. Requests with the same settings are batched.
* ``loglikelihood`` (context, continuation, doc_to_visual, doc_id, task, split): the prompt is
  encoded exactly as ``generate`` encodes it (chat template, generation prompt, image layouts),
  the continuation's tokens follow it, and one forward pass gives the sum of their log-probs and
  whether greedy decoding would have produced them (``continuation_score``).
* ``generate_until_multi_round``: round 0 answers the context; each later round asks the task's
  ``doc_to_text(doc, previous_output=…, round_idx=…, previous_round_info=…)`` for the next
  visuals and context until it signals the end; the result is the list of the rounds' answers.

Images: lmms-eval's ``<image>`` placeholder is fusionlm's. When the context has exactly one
placeholder per visual they stay where the task put them (interleaved); otherwise the
placeholders are dropped and the images go first, as fusionlm trains (``image_placement=first``
always does that). PIL images and image paths are images; a folder or a video file path is a
``Video`` (fusionlm decodes frame folders and animated images, not ``.mp4`` files).

A request fusionlm refuses (a prompt longer than the context, an unreadable image, an audio
input) is answered with ``""`` (log-likelihood ``-inf``) and a warning naming it, so one bad
document does not end a long run; ``strict=True`` raises instead.

Nothing here needs lmms-eval except ``FusionLMEval`` (built on first use) and ``register``: the
conversion, generation and scoring are plain functions and a plain ``FusionLMAdapter`` class.
"""

from .adapter import FusionLMAdapter, strict_image_loading
from .registration import (
    CLASS_PATH, LMMS_EVAL_VERSION, MODEL_NAME, MODULE, _register_if_installed, lmms_class, manifest, register,
)
from .requests import GenSettings, cut_at_stops, generation_settings, to_items, to_request
from .scoring import continuation_score, encode_prompt, loglikelihoods

__all__ = [
    "CLASS_PATH", "LMMS_EVAL_VERSION", "MODEL_NAME", "MODULE", "FusionLMAdapter", "GenSettings", "continuation_score",
    "cut_at_stops", "encode_prompt", "generation_settings", "lmms_class", "loglikelihoods", "manifest", "register",
    "strict_image_loading", "to_items", "to_request",
]


def __getattr__(name: str):
    if name == "FusionLMEval":
        return lmms_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_register_if_installed()
