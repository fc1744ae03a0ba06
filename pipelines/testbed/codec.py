"""The simplest honest VAE: an exactly invertible pixel (un)shuffle as a diffusers model.

``PixelShuffleAutoencoder`` has no learned weights. ``encode`` folds each ``s x s`` pixel block
into channels (``pixel_unshuffle``) and, for videos with ``temporal_factor = k``, folds time
causally like Wan's VAE: latent frame 0 holds pixel frame 0 (repeated in all ``k`` time slots), latent
frame ``i >= 1`` holds pixel frames ``k(i-1)+1 .. k*i``. So ``F = k*n + 1`` frames give
``n + 1 = (F - 1) // k + 1`` latent frames, exactly WanPipeline's count. ``decode`` undoes it; for
latent frame 0 it averages the ``k`` slots (pairwise, so identical slots give back the exact value).

Exactness: ``decode(encode(x)) == x`` bitwise (a permutation, plus the exact pairwise mean of equal
values). ``encode(decode(z)) == z`` holds except in latent frame 0 of a video, whose slots are
replaced by their mean (a generated latent need not repeat frame 0 in every slot).

It speaks both pipelines' VAE dialects:

* Wan (``AutoencoderKLWan``): ``z_dim``, ``latents_mean``/``latents_std`` (the pipeline computes
  ``z * std + mean`` before ``decode``), ``scale_factor_temporal``, ``scale_factor_spatial``,
  ``temperal_downsample`` (sic, Wan's spelling);
* SD3/FLUX (``AutoencoderKL``): ``latent_channels``, ``scaling_factor``, ``shift_factor`` (the
  pipeline computes ``z / scaling + shift``) and ``block_out_channels`` (only its length matters:
  the pipeline's spatial factor is ``2 ** (len - 1)``).

Pixels are in [-1, 1] like every diffusers VAE. ``encode`` returns ``.latent_dist`` with
``sample(generator)`` / ``mode()`` (a point mass), ``decode`` returns ``.sample``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin


class PointMass:
    """A deterministic "latent distribution": ``sample()`` and ``mode()`` both return the latent."""

    def __init__(self, latent: torch.Tensor):
        self.mean = self.latent = latent
        self.std = torch.zeros_like(latent)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latent

    def mode(self) -> torch.Tensor:
        return self.latent

    def kl(self, other=None) -> torch.Tensor:
        return torch.zeros(self.latent.shape[0], device=self.latent.device)


def _pairwise_mean(slots: list[torch.Tensor]) -> torch.Tensor:
    """Mean by a pairwise tree (exact for identical inputs when len is a power of two)."""
    n = len(slots)
    while len(slots) > 1:
        if len(slots) % 2:
            slots = slots[:-2] + [slots[-2] + slots[-1]]  # odd count: not exact, still correct
            continue
        slots = [slots[i] + slots[i + 1] for i in range(0, len(slots), 2)]
    return slots[0] * (1.0 / n)


class PixelShuffleAutoencoder(ModelMixin, ConfigMixin):
    """Pixel (un)shuffle codec; see the module docstring. ``None`` fields are derived."""

    config_name = "config.json"
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, in_channels: int = 3, spatial_factor: int = 2, temporal_factor: int = 1,
                 latents_mean: list[float] | None = None, latents_std: list[float] | None = None,
                 scaling_factor: float = 1.0, shift_factor: float = 0.0,
                 # derived, stored so pipelines can read them from the config:
                 z_dim: int | None = None, latent_channels: int | None = None,
                 scale_factor_spatial: int | None = None, scale_factor_temporal: int | None = None,
                 temperal_downsample: list[bool] | None = None, block_out_channels: list[int] | None = None):
        super().__init__()
        for name, v in (("spatial_factor", spatial_factor), ("temporal_factor", temporal_factor)):
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 1, got {v}")
        z = in_channels * spatial_factor ** 2 * temporal_factor
        levels_s, levels_t = int(math.log2(spatial_factor)), int(math.log2(temporal_factor))
        derived = dict(
            z_dim=z, latent_channels=z, scale_factor_spatial=spatial_factor,
            scale_factor_temporal=temporal_factor,
            temperal_downsample=[False] * max(levels_s - levels_t, 0) + [True] * levels_t,
            block_out_channels=[z] * (levels_s + 1),
            latents_mean=list(latents_mean) if latents_mean is not None else [0.0] * z,
            latents_std=list(latents_std) if latents_std is not None else [1.0] * z,
        )
        if len(derived["latents_mean"]) != z or len(derived["latents_std"]) != z:
            raise ValueError(f"latents_mean/latents_std need {z} entries (one per latent channel)")
        self.register_to_config(**derived)
        # ModelMixin reads dtype/device from parameters or buffers; this codec has no weights.
        self.register_buffer("dtype_anchor", torch.zeros(1))  # saved so save/from_pretrained have a weights file

    # -- diffusers VAE surface ----------------------------------------------------------------
    def enable_tiling(self, *args, **kwargs):  # nothing to tile: every op is local and exact
        pass

    def disable_tiling(self):
        pass

    def enable_slicing(self):
        pass

    def disable_slicing(self):
        pass

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        z = self._encode(x)
        return AutoencoderKLOutput(latent_dist=PointMass(z)) if return_dict else (PointMass(z),)

    def decode(self, z: torch.Tensor, return_dict: bool = True, **kwargs):
        x = self._decode(z)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True, **kwargs):
        return self.decode(self._encode(sample), return_dict=return_dict)

    # -- shuffles -------------------------------------------------------------------------------
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        s, k = self.config.spatial_factor, self.config.temporal_factor
        if x.ndim == 4:  # image [B, C, H, W]
            if k != 1:
                raise ValueError("this codec folds time; pass videos [B, C, F, H, W]")
            return F.pixel_unshuffle(x, s)
        if x.ndim != 5:
            raise ValueError(f"expected [B, C, H, W] or [B, C, F, H, W], got {tuple(x.shape)}")
        b, c, f, h, w = x.shape
        if (f - 1) % k:
            raise ValueError(f"{f} frames: this codec needs {k}n+1 frames (temporal factor {k})")
        y = F.pixel_unshuffle(x.transpose(1, 2).reshape(b * f, c, h, w), s)
        y = y.reshape(b, f, c * s * s, h // s, w // s)  # [B, F, C', h, w]
        first = y[:, :1].expand(b, k, *y.shape[2:])  # frame 0 in every slot: [B, k, C', h, w]
        rest = y[:, 1:].reshape(b, (f - 1) // k, k, *y.shape[2:])  # [B, n, k, C', h, w]
        z = torch.cat([first[:, None], rest], dim=1)  # [B, n+1, k, C', h, w]
        z = z.flatten(2, 3)  # channels = slot-major [k * C']
        return z.permute(0, 2, 1, 3, 4).contiguous()  # [B, k*C', n+1, h, w]

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        s, k = self.config.spatial_factor, self.config.temporal_factor
        if z.ndim == 4:
            if k != 1:
                raise ValueError("this codec folds time; pass video latents [B, C, T, H, W]")
            return F.pixel_shuffle(z, s)
        b, ck, t, h, w = z.shape
        c1 = ck // k
        y = z.permute(0, 2, 1, 3, 4).reshape(b, t, k, c1, h, w)
        first = _pairwise_mean([y[:, 0, i] for i in range(k)])[:, None]  # [B, 1, C', h, w]
        rest = y[:, 1:].reshape(b, (t - 1) * k, c1, h, w)
        frames = torch.cat([first, rest], dim=1)  # [B, F, C', h, w]
        f = frames.shape[1]
        x = F.pixel_shuffle(frames.reshape(b * f, c1, h, w), s)
        return x.reshape(b, f, -1, h * s, w * s).transpose(1, 2).contiguous()

    # -- normalisation as the pipelines apply it ------------------------------------------------
    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> the space the denoiser works in (the inverse of what the pipeline does
        before ``decode``): Wan-style per-channel ``(z - mean) / std`` for 5-D latents, SD3-style
        ``(z - shift) * scaling`` for 4-D latents."""
        if z.ndim == 5:
            mean = torch.tensor(self.config.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
            std = torch.tensor(self.config.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
            return (z - mean) / std
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim == 5:
            mean = torch.tensor(self.config.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
            std = torch.tensor(self.config.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
            return z * std + mean
        return z / self.config.scaling_factor + self.config.shift_factor
