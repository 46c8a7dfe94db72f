"""Hugging Face checkpoints in and out: LLaVA, Llama 3.2 Vision (Mllama), Fuyu, Janus and Emu3.

``import_checkpoint`` reads a transformers checkpoint directory (or hub id) and writes a fusionlm
checkpoint; ``export_checkpoint`` writes a directory that transformers' own class loads with
``from_pretrained``. Each format is one module: how its config maps onto a recipe, how its weight
names map onto ours, and what of a fusionlm model it can hold.
"""

from .formats import FORMATS, export_checkpoint, import_checkpoint  # noqa: F401
from . import emu3, fuyu, janus, llava, mllama  # noqa: F401,E402  (each registers its format)
