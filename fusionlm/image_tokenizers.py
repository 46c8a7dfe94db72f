"""Image tokenizers: the visual vocabulary that a model which draws writes in.

An image tokenizer turns a picture into a grid of discrete codes and back (``encode`` /
``decode``). Pixels are ``(B, 3, H, W)`` floats in [-1, 1]; codes are ``(B, h, w)`` longs with
``h = H / downsample``. Each kind is a class behind ``IMAGE_TOKENIZERS``:

* ``vq``: a convolutional autoencoder around vector-quantize-pytorch's ``VectorQuantize`` (k-means
  initialised, EMA-updated codebook, dead codes re-seeded from the batch, rotation-trick
  gradients). Its codebook is one codebook across processes: the library all-reduces the EMA
  statistics and k-means init when torch.distributed is initialised.
* ``palette``: an exact, untrained code for the synthetic world: each cell of ``downsample`` pixels
  becomes white or the world colour (``COLORS``) that covers at least half of it, so generation can
  be tested apart from the quality of a learned tokenizer. At ``downsample: 1`` it reproduces a
  world picture up to its anti-aliased edges (which it makes hard: at 32 px, GenEval fails 14% of
  the reconstructions, small shapes' staircase edges; at 64 px it passes them).

* ``janus`` / ``emu3``: a pretrained VQ model through the same ``hf:`` path as the other parts, run
  by transformers' own ``JanusVQVAE`` / ``Emu3VQVAE`` (the codes and pixels are theirs).

``usage`` reports what collapse would show first: the perplexity of the codes in use and how many
codes are dead (never chosen) over a set of pictures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .config import ImageTokenizerConfig
from .data.pixels.images import to_pixels
from .data.world.render import COLORS, WHITE
from .errors import ConfigError
from .hub import arch_of, check_custom_code, config_from_arch, load_part_of, load_pretrained
from .registry import Registry

IMAGE_TOKENIZERS: Registry[type["ImageTokenizer"]] = Registry("image tokenizer", "model.image_tokenizer.kind")


@dataclass
class Reconstruction:
    """One pass through a tokenizer: the decoded pixels, the codes and the training loss."""

    pixels: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    codes: torch.Tensor  # (B, h, w)
    loss: torch.Tensor  # () mean squared error + the quantiser's own losses
    mse: torch.Tensor  # () the reconstruction error alone


class ImageTokenizer(nn.Module):
    """The interface every kind implements."""

    continuous: bool = False  # codes are vectors (``patches``), not codebook indices

    def __init__(self, config: ImageTokenizerConfig):
        super().__init__()
        if config.image_size % config.downsample:
            raise ConfigError(f"model.image_tokenizer.image_size: {config.image_size} is not a multiple of "
                              f"downsample ({config.downsample})")
        self.config = config

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def grid(self) -> tuple[int, int]:
        """Codes per image, ``(rows, columns)``."""
        side = self.config.image_size // self.config.downsample
        return side, side

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor) -> Reconstruction:
        codes = self.encode(pixels)
        out = self.decode(codes)
        mse = F.mse_loss(out, pixels)
        return Reconstruction(out, codes, mse, mse.detach())


def _block(channels: int) -> nn.Module:
    groups = math.gcd(8, channels)
    return nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                         nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = _block(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@IMAGE_TOKENIZERS.register("vq")
class VQTokenizer(ImageTokenizer):
    """Conv encoder (a stride-2 convolution per halving) -> ``VectorQuantize`` -> conv decoder."""

    def __init__(self, config: ImageTokenizerConfig):
        super().__init__(config)
        from vector_quantize_pytorch import VectorQuantize

        halvings = int(math.log2(config.downsample))
        if 2 ** halvings != config.downsample:
            raise ConfigError(f"model.image_tokenizer.downsample: {config.downsample} is not a power of 2 (vq)")
        c = config.channels
        down: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1)]
        for _ in range(halvings):
            down += [_Residual(c), nn.Conv2d(c, c, 4, stride=2, padding=1)]
        down += [_Residual(c), nn.GroupNorm(math.gcd(8, c), c), nn.SiLU(), nn.Conv2d(c, config.code_dim, 1)]
        self.encoder = nn.Sequential(*down)
        self.quantizer = VectorQuantize(
            dim=config.code_dim, codebook_size=config.codebook_size, decay=config.decay,
            kmeans_init=config.kmeans_init, kmeans_iters=10, threshold_ema_dead_code=config.dead_code_threshold,
            commitment_weight=config.commitment, accept_image_fmap=True,
        )
        # k-means seeds and re-seeded dead codes are drawn from the vectors of every process, the same
        # draw everywhere: the codebook is the one a single process would grow on the whole batch
        book = self.quantizer._codebook
        book.sample_fn = book.replace_sample_fn = sample_from_all
        up: list[nn.Module] = [nn.Conv2d(config.code_dim, c, 3, padding=1), _Residual(c)]
        for _ in range(halvings):
            up += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1), _Residual(c)]
        up += [nn.GroupNorm(math.gcd(8, c), c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1)]
        self.decoder = nn.Sequential(*up)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            _, codes, _ = self.quantizer(self.encoder(pixels), freeze_codebook=True)  # (B, h, w)
        return codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        vectors = self.quantizer.get_output_from_indices(codes)  # (B, code_dim, h, w)
        return self.decoder(vectors)  # (B, 3, H, W)

    def forward(self, pixels: torch.Tensor) -> Reconstruction:
        quantized, codes, commit = self.quantizer(self.encoder(pixels))  # (B, D, h, w), (B, h, w), (1,)
        out = self.decoder(quantized)  # (B, 3, H, W)
        mse = F.mse_loss(out, pixels)
        return Reconstruction(out, codes, mse + commit.sum(), mse.detach())


@IMAGE_TOKENIZERS.register("multiscale")
class MultiScaleTokenizer(VQTokenizer):
    """VAR's multi-scale residual quantiser: the encoder's feature map ``f`` (code_dim, s, s) is
    quantised coarse to fine, one code map per scale of ``scales`` (1, 2, 4, 8 for a 32-pixel
    picture at downsample 4): scale k quantises the residual left by the scales before it, area-pooled
    to its side; its code vectors, upsampled to ``s`` (bicubic), are added to the reconstruction
    ``f_hat``, which the decoder turns into pixels. One ``VectorQuantize`` codebook serves every scale.

    The codes of a picture are one row, coarse to fine (``grid`` is ``(1, 1 + 4 + 16 + 64)``), so a
    sequence writes them as any other design's. ``scale_inputs`` gives what a next-scale model reads
    before predicting a scale: ``f_hat`` of the coarser scales, at that scale's side.
    VAR's per-scale convolutions on the upsampled code vectors (its ``phi``) are left out."""

    def __init__(self, config: ImageTokenizerConfig):
        super().__init__(config)
        side = config.image_size // config.downsample
        scales = list(config.scales) or [2 ** i for i in range(int(math.log2(side)) + 1)]
        if scales[-1] != side or any(a >= b for a, b in zip(scales, scales[1:])) or scales[0] < 1:
            raise ConfigError(f"model.image_tokenizer.scales: {scales} must rise from 1 or more to the code map's side "
                              f"{side} (image_size / downsample)")
        self.scales = scales

    @property
    def grid(self) -> tuple[int, int]:
        return 1, sum(k * k for k in self.scales)

    def spans(self) -> list[tuple[int, int]]:
        """Each scale's ``(start, end)`` in a picture's row of codes."""
        ends = torch.tensor([k * k for k in self.scales]).cumsum(0).tolist()
        return [(e - k * k, e) for e, k in zip(ends, self.scales)]

    def _up(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, k, k) -> (B, D, s, s): a scale's code vectors at the finest side."""
        side = self.scales[-1]
        return z if z.shape[-1] == side else F.interpolate(z, size=(side, side), mode="bicubic", align_corners=False)

    def _quantise(self, f: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """f (B, D, s, s) -> f_hat (B, D, s, s), codes (B, 1, n), the summed commitment loss."""
        if not bool(self.quantizer._codebook.initted):  # k-means on the finest map, not on one vector a picture
            self.quantizer(f.detach())
        residual, f_hat, codes = f, torch.zeros_like(f), []
        commit = f.new_zeros(())
        for k in self.scales:
            r = F.interpolate(residual, size=(k, k), mode="area")  # (B, D, k, k)
            _, idx, loss = self.quantizer(r, freeze_codebook=not train)  # (B, k, k), (1,)
            up = self._up(self.quantizer.get_output_from_indices(idx))  # (B, D, s, s)
            f_hat, residual = f_hat + up, residual - up
            commit, codes = commit + loss.sum(), codes + [idx.flatten(1)]
        return f_hat, torch.cat(codes, 1)[:, None], commit

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._quantise(self.encoder(pixels), train=False)[1]  # (B, 1, n)

    def maps(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """codes (B, 1, n) or (B, n) -> each scale's code vectors at the finest side, [(B, D, s, s)]."""
        codes = codes.reshape(len(codes), -1)
        return [self._up(self.quantizer.get_output_from_indices(codes[:, a:b].view(-1, k, k)))
                for (a, b), k in zip(self.spans(), self.scales)]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(sum(self.maps(codes)))  # (B, 3, H, W)

    def scale_inputs(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, n) -> (B, n - 1, D): for each scale after the first, ``f_hat`` of the scales
        before it area-pooled to its side, raster order (VAR's teacher-forced inputs): row ``j``
        is what predicts code ``j + 1``, the scale it belongs to seen only through coarser ones."""
        maps, f_hat, out = self.maps(codes), 0, []
        for k, m in zip(self.scales[1:], maps):
            f_hat = f_hat + m
            out.append(F.interpolate(f_hat, size=(k, k), mode="area").flatten(2).transpose(1, 2))  # (B, k*k, D)
        return torch.cat(out, 1)

    def forward(self, pixels: torch.Tensor) -> Reconstruction:
        f = self.encoder(pixels)  # (B, D, s, s)
        f_hat, codes, commit = self._quantise(f, train=self.training)
        out = self.decoder(f + (f_hat - f).detach())  # (B, 3, H, W): straight through to the encoder
        mse = F.mse_loss(out, pixels)
        return Reconstruction(out, codes, mse + commit, mse.detach())


@IMAGE_TOKENIZERS.register("patches")
class PatchTokenizer(ImageTokenizer):
    """No quantiser: a picture as its raw pixel patches, ``downsample`` pixels a side, each a
    continuous vector of ``3 * downsample**2`` values in [-1, 1] (what a diffusion design writes,
    Transfusion's "raw pixels at this scale"). Exact and untrained; ``encode`` gives (B, h, w, C)
    floats, not codes."""

    continuous = True

    def __init__(self, config: ImageTokenizerConfig):
        super().__init__(config)
        p = config.downsample
        if config.code_dim != 3 * p * p:
            raise ConfigError(f"model.image_tokenizer.code_dim: a patch of {p}x{p} pixels is {3 * p * p} values, "
                              f"got {config.code_dim}")

    @property
    def codebook_size(self) -> int:
        return 0

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        p = self.config.downsample
        x = pixels.reshape(len(pixels), 3, h, p, w, p)  # (B, 3, h, p, w, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(len(pixels), h, w, 3 * p * p)  # (B, h, w, C)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        p = self.config.downsample
        x = codes.reshape(len(codes), h, w, 3, p, p).clamp(-1, 1)  # (B, h, w, 3, p, p)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(len(codes), 3, h * p, w * p)  # (B, 3, H, W)


def sample_from_all(samples: torch.Tensor, num: int) -> torch.Tensor:
    """(C, n, d) this process's vectors -> (C, num, d) drawn from those of every process, in rank
    order, with the global random generator: the same vectors on every process (they hold the same
    generator state), and the vectors one process would draw from the whole batch.

    vector-quantize-pytorch's own distributed sampler draws each process's share from its own
    vectors, so N processes grew a different codebook from one; with this, they grow the same."""
    from vector_quantize_pytorch.vector_quantize_pytorch import batched_sample_vectors

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        sizes = [torch.zeros(1, dtype=torch.long, device=samples.device) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, torch.tensor([samples.shape[1]], device=samples.device))
        width = int(max(sizes))
        padded = samples.new_zeros(samples.shape[0], width, samples.shape[2])  # (C, width, d)
        padded[:, : samples.shape[1]] = samples
        everyone = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(everyone, padded.contiguous())
        samples = torch.cat([x[:, : int(n)] for x, n in zip(everyone, sizes)], dim=1)  # (C, N, d)
    return batched_sample_vectors(samples, num)


HALF = (0.5, 0.5, 0.5)
PALETTE = torch.tensor([WHITE, *COLORS.values()], dtype=torch.float32) / 127.5 - 1  # (7, 3) in [-1, 1]


@IMAGE_TOKENIZERS.register("palette")
class PaletteTokenizer(ImageTokenizer):
    """Each ``downsample`` x ``downsample`` cell as white (0) or the world colour covering it (1-6)."""

    def __init__(self, config: ImageTokenizerConfig):
        super().__init__(config)
        if config.codebook_size != len(PALETTE):
            raise ConfigError(f"model.image_tokenizer.codebook_size: the palette tokenizer has {len(PALETTE)} codes "
                              f"(white and the world's colours), got {config.codebook_size}")
        self.register_buffer("palette", PALETTE.clone(), persistent=False)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """A cell is a colour when it lies nearest that colour's line from white and is at least half
        covered by it, else white (the rule ``evaluate.geneval`` segments by: a half-blue edge is
        blue or white, never the purple it is nearest to)."""
        cells = F.avg_pool2d(pixels, self.config.downsample).permute(0, 2, 3, 1)  # (B, h, w, 3)
        away = self.palette[0] - cells  # (B, h, w, 3) from white
        axes = self.palette[0] - self.palette[1:]  # (6, 3) white -> each colour
        cover = away @ axes.T / (axes * axes).sum(-1)  # (B, h, w, 6)
        off = (away[..., None, :] - cover[..., None] * axes).norm(dim=-1)  # (B, h, w, 6) distance off each line
        best = off.masked_fill(cover <= 0, float("inf")).argmin(-1)  # (B, h, w)
        covered = cover.gather(-1, best[..., None])[..., 0] >= 0.5  # (B, h, w)
        return torch.where(covered, best + 1, torch.zeros_like(best))  # (B, h, w)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        flat = self.palette[codes].permute(0, 3, 1, 2)  # (B, 3, h, w)
        return F.interpolate(flat, scale_factor=self.config.downsample, mode="nearest")  # (B, 3, H, W)


class PretrainedTokenizer(ImageTokenizer):
    """A transformers VQ model as the tokenizer, run by its own modules (so its codes and pixels are
    transformers' own): from ``hf`` (a directory or hub id), or rebuilt from a recorded ``arch``
    (the weights then come from a fusionlm checkpoint). The tokenizer's ``config`` records the
    architecture, grid and codebook the model settled; the caller's config is left as given."""

    model_types: tuple[str, ...] = ()
    # whole models that hold this VQ model ({model type: where its weights are}): a hub id such as
    # deepseek-community/Janus-Pro-1B names the whole model, whose vq_config and VQ weights are read
    whole: dict[str, tuple[str, ...]] = {}

    def __init__(self, config: ImageTokenizerConfig):
        key = "model.image_tokenizer"
        cls = self.model_class()
        if config.hf:
            raw = check_custom_code(config.hf, allow=config.allow_custom_code, key=f"{key}.hf")
            if raw.get("model_type") in self.whole:
                vq = load_part_of(cls, config.hf, raw, sub_config="vq_config", prefixes=self.whole[raw["model_type"]],
                                  key=f"{key}.hf")
            else:
                vq = load_pretrained(cls, config.hf, dtype="float32", allow_custom_code=config.allow_custom_code,
                                     key=f"{key}.hf", model_types=self.model_types)
        elif config.arch:
            vq = cls(config_from_arch(config.arch, key=f"{key}.arch"))
        else:
            raise ConfigError(f"{key}: kind {config.kind!r} needs hf (a pretrained VQ model) or a recorded arch")
        down, codes, grid = self.shape_of(vq)
        super().__init__(replace(config, downsample=down, codebook_size=codes, code_dim=vq.config.embed_dim,
                                 image_size=grid * down if grid else config.image_size, arch=arch_of(vq.config)))
        self.vq = vq.eval()

    @staticmethod
    def model_class():
        raise NotImplementedError

    def shape_of(self, vq) -> tuple[int, int, int | None]:
        """(pixels per code, codebook size, codes per side if the model fixes it)."""
        raise NotImplementedError


@IMAGE_TOKENIZERS.register("janus")
class JanusTokenizer(PretrainedTokenizer):
    """Janus's VQ model (``JanusVQVAE``): a fixed ``num_patches`` x ``num_patches`` grid."""

    model_types = ("janus_vqgan",)
    whole = {"janus": ("model.vqmodel.",)}

    @staticmethod
    def model_class():
        from transformers.models.janus.modeling_janus import JanusVQVAE

        return JanusVQVAE

    def shape_of(self, vq):
        c = vq.config
        return 2 ** (len(c.channel_multiplier) - 1), c.num_embeddings, c.num_patches

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        rows, cols = self.grid
        return self.vq.encode(pixels).image_tokens.view(pixels.shape[0], rows, cols)  # (B, h, w)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.vq.decode(codes.flatten(1))  # (B, 3, H, W)


@IMAGE_TOKENIZERS.register("emu3")
class Emu3Tokenizer(PretrainedTokenizer):
    """Emu3's VQ model (``Emu3VQVAE``): any image size divisible by its spatial factor."""

    model_types = ("emu3_vqgan",)
    whole = {"emu3": ("vqmodel.", "model.vqmodel.")}  # transformers writes Emu3's at the top, names it the second way

    @staticmethod
    def model_class():
        from transformers.models.emu3.modeling_emu3 import Emu3VQVAE

        return Emu3VQVAE

    def shape_of(self, vq):
        return vq.vision_spatial_factor, vq.config.codebook_size, None

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        sizes = torch.tensor([list(pixels.shape[-2:])] * pixels.shape[0])  # (B, 2)
        return torch.stack(self.vq.encode(pixels, image_sizes=sizes).image_tokens)  # (B, h, w)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.vq.decode(codes)  # (B, 3, H, W)


def build_image_tokenizer(config: ImageTokenizerConfig) -> ImageTokenizer:
    return IMAGE_TOKENIZERS.get(config.kind)(config)


def pixels_of(images: list[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> ``(B, 3, size, size)`` in [-1, 1]: the one image loader's ``to_pixels`` (letterboxed
    when not ``size`` square) at mean = std = 0.5."""
    return torch.stack([to_pixels(im, size, mean=HALF, std=HALF) for im in images])  # (B, 3, size, size)


def images_of(pixels: torch.Tensor) -> list[Image.Image]:
    """``(B, 3, H, W)`` in [-1, 1] -> PIL images."""
    arrays = ((pixels.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def psnr(reconstructed: torch.Tensor, original: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of pixels in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(reconstructed.clamp(-1, 1), original).item()
    return float("inf") if mse == 0 else 10 * math.log10(4 / mse)


def usage(codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """How the codes of a batch spread over the codebook: ``perplexity`` (exp of the entropy of
    their histogram: the number of equally used codes it equals), ``used`` (the share of the
    codebook that appears) and ``dead`` (how many codes do not)."""
    return counts_usage(torch.bincount(codes.flatten(), minlength=codebook_size).double())


def counts_usage(counts: torch.Tensor) -> dict[str, float]:
    """``usage`` from the histogram ``counts`` (codebook_size,) of the codes chosen."""
    counts = counts.double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"perplexity": float(entropy.exp()), "used": float((counts > 0).double().mean()),
            "dead": int((counts == 0).sum())}
