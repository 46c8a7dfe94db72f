"""``--set dotted.key=value`` overrides, applied to a recipe dict before it is typed."""

from __future__ import annotations

from typing import Any

import yaml

from ..errors import ConfigError


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``dotted.key=value`` overrides (``stages.0.steps=20``) to a recipe dict in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.split(".")
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            node = _step_into(node, part, ".".join(parts[: depth + 1]), create=True)
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(node, last, dotted)] = _parse_value(raw)
        elif isinstance(node, dict):
            node[last] = _parse_value(raw)
        else:
            raise ConfigError(f"{'.'.join(parts[:-1])}: cannot set a key inside a {type(node).__name__}")
    return data


def _list_index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{key}: {part!r} is not an index of a list of length {len(node)}")
    return int(part)


def _step_into(node: Any, part: str, key: str, *, create: bool) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, key)]
    if not isinstance(node, dict):
        raise ConfigError(f"{key}: cannot set a key inside a {type(node).__name__}")
    if part not in node or node[part] is None:
        if not create:
            raise ConfigError(f"{key}: no such key")
        node[part] = {}
    return node[part]
