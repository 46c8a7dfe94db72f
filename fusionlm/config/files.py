"""Recipe files: the shipped recipes, reading a recipe with its overrides, and the config saved
next to a model's weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .convert import from_dict, to_dict
from .overrides import apply_overrides
from .schema import RecipeConfig
from .validate import validate


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    """Read a recipe YAML (a path, or the name of a shipped recipe), apply overrides, validate."""
    path = resolve_recipe_path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with model/data/train/stages")
    apply_overrides(data, overrides or [])
    try:
        return validate(from_dict(data))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


RECIPES_DIR = Path(__file__).parent.parent / "recipes"


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe_path(path: str | Path) -> Path:
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    shipped = RECIPES_DIR / f"{path}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"{path}: no such recipe file (shipped recipes: {', '.join(shipped_recipes())})")


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def load_config(path: str | Path) -> RecipeConfig:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None
    try:
        return validate(from_dict(data))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
