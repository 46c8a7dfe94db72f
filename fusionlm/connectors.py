"""Connectors: encoder features (I, N, D_enc) -> LLM-width tokens (I, N', D_llm)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        self.in_grid = tuple(grid)  # the encoder's grid (rows, cols) at the configured size
        self.grid = self.grid_rule(config).apply(grid)  # output grid (rows, cols) at the configured size

    @classmethod
    def grid_rule(cls, config: ConnectorConfig) -> GridRule:
        return GridRule()

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def image_grids(self, feats: torch.Tensor, grids: list[tuple[int, int]] | None) -> list[tuple[int, int]]:
        """Each image's encoder grid (the configured one when ``grids`` is None), checked against ``feats``."""
        grids = [self.in_grid] * feats.shape[0] if grids is None else [(int(r), int(c)) for r, c in grids]
        if len(grids) != feats.shape[0] or max(r * c for r, c in grids) > feats.shape[1]:
            raise ValueError(f"connector: features {tuple(feats.shape)} do not hold images of grids {grids}")
        return grids

    def out_counts(self, grids: list[tuple[int, int]]) -> list[int]:
        """Output tokens of each image (the first ones of its row of the output; the rest are zeros)."""
        rule = self.grid_rule(self.config)
        return [r * c for r, c in map(rule.apply, grids)]


@CONNECTORS.register("none")
class NoConnector(Connector):
    """No connector (the ``early`` fusion: pictures are codes the LLM embeds itself)."""

    def forward(self, feats: torch.Tensor, grids: list[tuple[int, int]] | None = None) -> torch.Tensor:
        raise ConfigError("model.connector.kind: 'none' maps no features (the early fusion writes pictures as codes)")


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


# ----------------------------------------------------------------------------- resampling connectors


def _check(config: ConnectorConfig, *names: str) -> None:
    """``model.connector.<name>`` must be >= 1 for each name (hidden_size may also be None)."""
    for name in names:
        value = getattr(config, name)
        if name == "hidden_size" and value is None:
            continue
        if value < 1:
            raise ConfigError(f"model.connector.{name}: must be >= 1, got {value}")


def _check_heads(config: ConnectorConfig, width: int) -> None:
    if width % config.num_heads:
        raise ConfigError(f"model.connector.num_heads: {config.num_heads} does not divide the connector's width "
                          f"{width} (model.connector.hidden_size, default the LLM width)")


def _real_tokens(feats: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """(I, N) True where a token is one of its image's first ``counts[i]`` (its real features)."""
    n = torch.arange(feats.shape[1], device=feats.device)  # (N,)
    return n[None] < torch.tensor(counts, device=feats.device)[:, None]  # (I, N)


class _MLP(nn.Module):
    """linear-act-linear (LLaVA-1.5's projector), used as the readout of the connectors below."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, config: ConnectorConfig):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden, bias=config.bias)
        self.act = ACT2FN[config.act]
        self.linear_2 = nn.Linear(hidden, out_dim, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))  # (..., D_out)


class _PerGridConnector(Connector):
    """A connector that works on each image's 2-D feature map: images are run in groups of equal
    grids, so padding never enters and an image's outputs do not depend on the others."""

    def forward(self, feats: torch.Tensor, grids: list[tuple[int, int]] | None = None) -> torch.Tensor:
        grids = self.image_grids(feats, grids)
        counts = self.out_counts(grids)
        out = None
        for grid in dict.fromkeys(grids):  # distinct grids, in order
            rows, cols = grid
            idx = torch.tensor([i for i, g in enumerate(grids) if g == grid], device=feats.device)
            x = feats[idx, : rows * cols].unflatten(1, (rows, cols))  # (k, rows, cols, D_in)
            y = self.forward_grid(x)  # (k, n_out, D_out)
            if out is None:
                out = y.new_zeros(feats.shape[0], max(counts), y.shape[-1])  # (I, N_out_max, D_out)
            out[idx, : y.shape[1]] = y
        return out  # (I, N_out_max, D_out)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(k, D, rows, cols) -> (k, D, rows', cols'): adaptive average pooling to the rule's grid."""
        return F.adaptive_avg_pool2d(x, self.grid_rule(self.config).apply(tuple(x.shape[-2:])))

    def forward_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(k, rows, cols, D_in) feature maps of k images of one grid -> (k, n_out, D_out)."""
        raise NotImplementedError


@CONNECTORS.register("avgpool")
class AvgPoolConnector(_PerGridConnector):
    """Average pooling to about ``num_tokens`` tokens, aspect kept, then an MLP (Emu2 pools
    EVA-CLIP's 16x16 grid to 8x8 = 64 tokens; here the readout is LLaVA-1.5's linear-act-linear of
    width ``hidden_size``, default the LLM width)."""

    def __init__(self, config: ConnectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int]):
        _check(config, "num_tokens", "hidden_size")
        super().__init__(config, in_dim, out_dim, grid)
        self.mlp = _MLP(in_dim, config.hidden_size or out_dim, out_dim, config)

    @classmethod
    def grid_rule(cls, config: ConnectorConfig) -> GridRule:
        return GridRule("pool", config.num_tokens)

    def forward_grid(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pooled(x.permute(0, 3, 1, 2))  # (k, D_in, rows', cols')
        return self.mlp(x.flatten(2).transpose(1, 2))  # (k, rows'*cols', D_out)


class _ResBlock(nn.Module):
    """x + SiLU(LayerNorm(conv3x3(x))) on a (k, C, rows, cols) map; the norm is over channels,
    per position (Honeybee's LayerNorm2d), so nothing mixes images."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1)
        self.norm = nn.LayerNorm(dim)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).permute(0, 2, 3, 1)  # (k, rows, cols, C)
        return x + self.act(self.norm(y)).permute(0, 3, 1, 2)  # (k, C, rows, cols)


@CONNECTORS.register("cabstractor")
class CAbstractorConnector(_PerGridConnector):
    """Honeybee's C-Abstractor (MM1's choice of connector): ``depth`` residual convolution blocks on
    the (rows, cols) feature map, adaptive average pooling to about ``num_tokens`` tokens (aspect
    kept), ``depth`` more blocks, then an MLP readout to the LLM width.

    Simplified against Honeybee: its blocks are RegNet bottlenecks (1x1 - grouped 3x3 with
    squeeze-excitation - 1x1) and it adds learned position embeddings to the input; here a block is
    conv3x3-LayerNorm-SiLU with a residual, a 1x1 projection takes the encoder width to the
    connector's width ``hidden_size`` (default the LLM width) first, and the 3x3 convolutions' zero
    padding is the only position signal (so any grid works).
    """

    def __init__(self, config: ConnectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int]):
        _check(config, "num_tokens", "depth", "hidden_size")
        super().__init__(config, in_dim, out_dim, grid)
        width = config.hidden_size or out_dim
        self.proj_in = nn.Linear(in_dim, width, bias=config.bias)
        self.stage_1 = nn.Sequential(*(_ResBlock(width) for _ in range(config.depth)))
        self.stage_2 = nn.Sequential(*(_ResBlock(width) for _ in range(config.depth)))
        self.readout = _MLP(width, width, out_dim, config)

    @classmethod
    def grid_rule(cls, config: ConnectorConfig) -> GridRule:
        return GridRule("pool", config.num_tokens)

    def forward_grid(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x).permute(0, 3, 1, 2)  # (k, W, rows, cols)
        x = self.stage_2(self.pooled(self.stage_1(x)))  # (k, W, rows', cols')
        return self.readout(x.flatten(2).transpose(1, 2))  # (k, rows'*cols', D_out)


class _PerceiverLayer(nn.Module):
    """Flamingo's resampler layer: latents attend to [media ; latents], then a feed-forward."""

    def __init__(self, width: int, heads: int, config: ConnectorConfig, ff_mult: int = 4):
        super().__init__()
        self.heads = heads
        self.norm_media = nn.LayerNorm(width)
        self.norm_latents = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, width, bias=False)
        self.to_kv = nn.Linear(width, 2 * width, bias=False)
        self.to_out = nn.Linear(width, width, bias=False)
        self.ff = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, ff_mult * width, bias=False),
                                ACT2FN[config.act], nn.Linear(ff_mult * width, width, bias=False))

    def forward(self, media: torch.Tensor, latents: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """media (I, N, W), latents (I, L, W), keep (I, N + L) True where a key may be attended."""
        lat = self.norm_latents(latents)  # (I, L, W)
        kv_in = torch.cat([self.norm_media(media), lat], dim=1)  # (I, N+L, W)
        q = self.to_q(lat).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (I, h, L, W/h)
        k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.to_kv(kv_in).chunk(2, -1))  # (I, h, N+L, W/h)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])  # (I, h, L, W/h)
        latents = latents + self.to_out(attn.transpose(1, 2).flatten(2))  # (I, L, W)
        return latents + self.ff(latents)  # (I, L, W)


class _LearnedQueries(Connector):
    """Connectors whose ``num_tokens`` learned queries read the image: a fixed token count."""

    def __init__(self, config: ConnectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int]):
        _check(config, "num_tokens", "depth", "num_heads", "hidden_size")
        super().__init__(config, in_dim, out_dim, grid)
        self.width = config.hidden_size or out_dim
        _check_heads(config, self.width)

    @classmethod
    def grid_rule(cls, config: ConnectorConfig) -> GridRule:
        return GridRule("fixed", config.num_tokens)

    def real_features(self, feats: torch.Tensor, grids) -> tuple[torch.Tensor, torch.Tensor]:
        """Features cut to the longest image with the padding zeroed (I, N, D), and the (I, N) mask of
        real tokens."""
        counts = [r * c for r, c in self.image_grids(feats, grids)]
        feats = feats[:, : max(counts)]  # (I, N, D_in)
        real = _real_tokens(feats, counts)  # (I, N)
        return torch.where(real[..., None], feats, 0.0), real


@CONNECTORS.register("perceiver")
class PerceiverConnector(_LearnedQueries):
    """Flamingo's Perceiver Resampler: ``num_tokens`` learned latents, ``depth`` layers of
    cross-attention (latents attend to [image features ; latents], padding masked out) and a
    feed-forward, a final LayerNorm, then a projection to the LLM width.

    The resampler works at width ``hidden_size`` (default the LLM width); a linear layer takes the
    encoder's features there first when the widths differ (as Idefics2 projects before its
    resampler). Like Flamingo's, it has no spatial position embeddings.
    """

    def __init__(self, config: ConnectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int]):
        super().__init__(config, in_dim, out_dim, grid)
        width = self.width
        self.latents = nn.Parameter(torch.randn(config.num_tokens, width))  # (L, W)
        self.proj_in = nn.Linear(in_dim, width, bias=config.bias) if in_dim != width else nn.Identity()
        self.layers = nn.ModuleList(_PerceiverLayer(width, config.num_heads, config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, out_dim, bias=config.bias)

    def forward(self, feats: torch.Tensor, grids: list[tuple[int, int]] | None = None) -> torch.Tensor:
        feats, real = self.real_features(feats, grids)  # (I, N, D_in), (I, N)
        media = self.proj_in(feats)  # (I, N, W)
        latents = self.latents.expand(feats.shape[0], -1, -1)  # (I, L, W)
        keep = torch.cat([real, real.new_ones(latents.shape[:2])], dim=1)  # (I, N+L)
        for layer in self.layers:
            latents = layer(media, latents, keep)  # (I, L, W)
        return self.proj_out(self.norm(latents))  # (I, L, D_out)


@CONNECTORS.register("qformer")
class QFormerConnector(_LearnedQueries):
    """BLIP-2 / InstructBLIP's Q-Former: ``num_tokens`` learned queries through transformers'
    ``Blip2QFormerModel`` (``depth`` layers of self-attention, cross-attention to the image
    features in every layer, feed-forward), then BLIP-2's ``language_projection`` to the LLM width.

    Width ``hidden_size`` (default the LLM width), feed-forward 4x, no dropout (like the rest of
    fusionlm's parts); a LayerNorm on the features stands in for the post-layernorm of BLIP-2's
    ViT, and queries start as BLIP-2's (normal, std 0.02). InstructBLIP's text input to the
    Q-Former is left out: the queries see only the image.
    """

    def __init__(self, config: ConnectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int]):
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        super().__init__(config, in_dim, out_dim, grid)
        width = self.width
        qconfig = Blip2QFormerConfig(
            hidden_size=width, num_hidden_layers=config.depth, num_attention_heads=config.num_heads,
            intermediate_size=4 * width, hidden_act=config.act, encoder_hidden_size=in_dim,
            cross_attention_frequency=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        self.norm_in = nn.LayerNorm(in_dim)
        self.query_tokens = nn.Parameter(torch.randn(1, config.num_tokens, width) * qconfig.initializer_range)
        self.qformer = Blip2QFormerModel(qconfig)
        self.language_projection = nn.Linear(width, out_dim, bias=config.bias)

    def forward(self, feats: torch.Tensor, grids: list[tuple[int, int]] | None = None) -> torch.Tensor:
        feats, real = self.real_features(feats, grids)  # (I, N, D_in), (I, N)
        image = self.norm_in(feats)  # (I, N, D_in)
        queries = self.query_tokens.expand(feats.shape[0], -1, -1)  # (I, L, W)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image,
                           encoder_attention_mask=real.long()).last_hidden_state  # (I, L, W)
        return self.language_projection(out)  # (I, L, D_out)


def build_connector(config: ConnectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int]) -> Connector:
    if config.act not in ACT2FN:
        raise ConfigError(f"model.connector.act: unknown activation {config.act!r} (e.g. gelu, silu, relu)")
    return CONNECTORS.get(config.kind)(config, in_dim, out_dim, grid)
