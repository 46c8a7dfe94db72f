"""One typed, nested config: the single source of truth for a model and its training run.

A recipe YAML has four top-level sections — ``model``, ``data``, ``train``, ``stages`` — that map
onto the dataclasses of ``schema``. Loading is strict: an unknown key, a missing required key or a
value of the wrong type is a ``ConfigError`` that names the dotted key and what is allowed
(``convert``); ``--set`` overrides apply before typing (``overrides``), checks beyond the types
after it (``validate``). The config is saved next to the weights, and a model is rebuilt from it
alone (``files``).
"""

from .convert import from_dict, to_dict
from .files import RECIPES_DIR, load_config, load_recipe, resolve_recipe_path, save_config, shipped_recipes
from .overrides import apply_overrides
from .schema import (
    CHOICES, DTYPES, LOSS_KINDS, LORA_PARTS, OBJECTIVE_NAMES, PARTS, REPORT_TO, SOURCE_FORMATS, STAND_INS, TRAINABLE_GROUPS,
    ConnectorConfig, DataConfig, EncoderConfig, FusionConfig, GenerationConfig, ImageTokenizerConfig, LLMConfig, LoraConfig, ModelConfig,
    RecipeConfig, SourceConfig, StageConfig, TilingConfig, TokenizerConfig, TrainConfig, VideoConfig,
)
from .validate import _validate_sources, validate

__all__ = [
    "CHOICES", "DTYPES", "LOSS_KINDS", "LORA_PARTS", "OBJECTIVE_NAMES", "PARTS", "RECIPES_DIR", "REPORT_TO", "SOURCE_FORMATS",
    "STAND_INS", "TRAINABLE_GROUPS", "ConnectorConfig", "DataConfig", "EncoderConfig", "FusionConfig", "GenerationConfig",
    "ImageTokenizerConfig", "LLMConfig", "LoraConfig", "ModelConfig", "RecipeConfig", "SourceConfig", "StageConfig",
    "TilingConfig", "TokenizerConfig", "TrainConfig", "VideoConfig", "_validate_sources", "apply_overrides",
    "from_dict", "load_config", "load_recipe", "resolve_recipe_path", "save_config", "shipped_recipes", "to_dict", "validate",
]
