"""Connectors: encoder features (I, N, D_enc) -> LLM-width tokens (I, N', D_llm)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from .config import ConnectorConfig
from .data.layout import GridRule
from .errors import ConfigError
from .registry import Registry

CONNECTORS: Registry[type["Connector"]] = Registry("connector", "model.connector.kind")


class Connector(nn.Module):
    """Maps (I, N, D_in) features of images with encoder grids ``grids`` to (I, N', D_out) tokens.

    ``grid_rule`` says how many tokens an image of a given encoder grid becomes; ``grid`` is the
    output grid at the configured image size.
    """

    def __init__(self, config: ConnectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int]):
        super().__init__()
        self.config = config
        self.grid = self.grid_rule(config).apply(grid)  # output grid (rows, cols) at the configured size

    @classmethod
    def grid_rule(cls, config: ConnectorConfig) -> GridRule:
        return GridRule()

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


@CONNECTORS.register("linear")
class LinearConnector(Connector):
    """One projection (LLaVA-1, Fuyu's patch projection)."""

    def __init__(self, config: ConnectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int]):
        super().__init__(config, in_dim, out_dim, grid)
        self.proj = nn.Linear(in_dim, out_dim, bias=config.bias)

    def forward(self, feats: torch.Tensor, grids: list[tuple[int, int]] | None = None) -> torch.Tensor:
        return self.proj(feats)  # (I, N, D_llm)


@CONNECTORS.register("mlp")
class MLPConnector(Connector):
    """Two layers with an activation (GELU by default) between them (LLaVA-1.5)."""

    def __init__(self, config: ConnectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int]):
        super().__init__(config, in_dim, out_dim, grid)
        hidden = config.hidden_size or out_dim
        self.linear_1 = nn.Linear(in_dim, hidden, bias=config.bias)
        self.act = ACT2FN[config.act]
        self.linear_2 = nn.Linear(hidden, out_dim, bias=config.bias)

    def forward(self, feats: torch.Tensor, grids: list[tuple[int, int]] | None = None) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(feats)))  # (I, N, D_llm)


def build_connector(config: ConnectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int]) -> Connector:
    if config.act not in ACT2FN:
        raise ConfigError(f"model.connector.act: unknown activation {config.act!r} (e.g. gelu, silu, relu)")
    return CONNECTORS.get(config.kind)(config, in_dim, out_dim, grid)
