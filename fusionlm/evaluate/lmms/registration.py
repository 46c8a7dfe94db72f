"""``FusionLMEval`` and its registration with lmms-eval, built on first use so that importing
fusionlm never needs lmms-eval."""

from __future__ import annotations

import logging

from .adapter import FusionLMAdapter

MODEL_NAME = "fusionlm"
MODULE = "fusionlm.evaluate.lmms"  # the package, also when run as ``python -m``
CLASS_PATH = f"{MODULE}.FusionLMEval"
LMMS_EVAL_VERSION = "0.7.3"

log = logging.getLogger("fusionlm.lmms")

_LMMS_CLASS: type | None = None


def lmms_class() -> type:
    """``FusionLMEval``: ``FusionLMAdapter`` as a subclass of lmms-eval's ``lmms`` (built on first
    use, so that importing this module never needs lmms-eval)."""
    global _LMMS_CLASS
    if _LMMS_CLASS is None:
        try:
            from lmms_eval.api.model import lmms
        except ImportError as exc:
            raise ImportError(f"lmms-eval is not installed: pip install 'fusionlm[lmms]' "
                              f"(lmms-eval=={LMMS_EVAL_VERSION}) ({exc})") from None
        _LMMS_CLASS = type("FusionLMEval", (FusionLMAdapter, lmms), {
            "__module__": MODULE, "__qualname__": "FusionLMEval",
            "__doc__": "A fusionlm checkpoint as an lmms-eval model (``--model fusionlm``).\n\n"
                       + (FusionLMAdapter.__doc__ or ""),
        })
    return _LMMS_CLASS


def manifest():
    """lmms-eval's ``ModelManifest`` for ``fusionlm`` (also usable as an ``lmms_eval.models`` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def register() -> type:
    """Register ``FusionLMEval`` with lmms-eval under ``fusionlm``: in the registry its evaluator
    resolves names with (``lmms_eval.models``' manifests) and in the ``register_model`` one."""
    cls = lmms_class()
    from lmms_eval.api.registry import register_model
    from lmms_eval.models import AVAILABLE_MODELS, MODEL_REGISTRY_V2

    register_model(MODEL_NAME)(cls)
    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
    AVAILABLE_MODELS[MODEL_NAME] = "FusionLMEval"
    return cls


def _register_if_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("lmms_eval") is None:
        return
    try:
        register()
    except Exception as exc:  # a broken or half-imported lmms-eval must not break fusionlm
        log.debug("fusionlm: not registered with lmms-eval (%s)", exc)
