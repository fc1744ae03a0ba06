"""Full-size published DiT architectures with random weights, for GPU benchmarks.

``random_transformer(arch, device, dtype)`` builds only the transformer;
``random_pipeline(arch, device, dtype)`` wraps it in the right diffusers pipeline class with
*small stand-ins* for everything else, so a benchmark can call the pipeline end to end:

* text encoders keep the interface widths the transformer expects but have 1 layer, few heads
  and a tiny feed-forward, on the character-level tokenizers of :mod:`mixdit.pipelines.tiny`:
  SD3.5 gets CLIP-L-like (hidden 768, projection 768) and CLIP-G-like (hidden 1280, projection
  1280) ``CLIPTextModelWithProjection`` (pooled 768 + 1280 = 2048; hidden 768 + 1280 = 2048,
  zero-padded by the pipeline to T5's 4096) and a T5 encoder with ``d_model=4096``; FLUX.1 gets a
  ``CLIPTextModel`` with hidden 768 (pooled 768) and a T5 encoder with ``d_model=4096``; Wan gets a
  ``UMT5EncoderModel`` with ``d_model=4096``. Token counts are the real ones (77 CLIP, 256/512 T5).
* the VAE is a narrow ``AutoencoderKL`` / ``AutoencoderKLWan`` with the real latent channels (16)
  and the real down-sampling factors (8x space; Wan also 4x time), so latent and token grids are
  exactly the published ones; its cost is far below the real VAE's.
* the scheduler is the published one (flow-match Euler for SD3/FLUX, UniPC flow for Wan).

Weights never pass through the CPU: parameters are created on the ``meta`` device (buffers such
as rotary tables and SD3's positional table are built on the target device), then materialised
with ``torch.empty(..., device=device, dtype=dtype)`` and initialised in place from a seeded
generator on that device (weights ~ N(0, 0.02), biases 0, norm weights 1). Modules the class keeps
in float32 (``_keep_in_fp32_modules``, e.g. Wan's time embedder and modulation tables) stay float32
as ``from_pretrained(torch_dtype=...)`` would leave them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from mixdit.errors import ModelNotFoundError


@dataclass(frozen=True)
class RandomArch:
    """One published architecture: its family, transformer class name and exact config."""

    family: str  # "sd3" | "flux" | "wan"
    transformer_class: str  # name in ``diffusers``
    config: dict
    published_as: str  # the hub repo whose transformer/config.json this copies
    experts: int = 1  # 2 for Wan 2.2 A14B (transformer + transformer_2)
    pipeline_extra: dict = field(default_factory=dict)


_SD3_COMMON = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                   joint_attention_dim=4096, pooled_projection_dim=2048)
_FLUX_COMMON = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                    pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
_WAN_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                   freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                   rope_max_seq_len=1024)

RANDOM_ARCHS: dict[str, RandomArch] = {
    "sd3.5-medium": RandomArch(
        "sd3", "SD3Transformer2DModel",
        dict(_SD3_COMMON, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
             pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
        "stabilityai/stable-diffusion-3.5-medium"),
    "sd3.5-large": RandomArch(
        "sd3", "SD3Transformer2DModel",
        dict(_SD3_COMMON, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
             pos_embed_max_size=192, dual_attention_layers=(), qk_norm="rms_norm"),
        "stabilityai/stable-diffusion-3.5-large"),
    "flux.1-dev": RandomArch("flux", "FluxTransformer2DModel", dict(_FLUX_COMMON, guidance_embeds=True),
                             "black-forest-labs/FLUX.1-dev"),
    "flux.1-schnell": RandomArch("flux", "FluxTransformer2DModel", dict(_FLUX_COMMON, guidance_embeds=False),
                                 "black-forest-labs/FLUX.1-schnell"),
    "wan2.1-1.3b": RandomArch(
        "wan", "WanTransformer3DModel",
        dict(_WAN_COMMON, num_layers=30, num_attention_heads=12, ffn_dim=8960),
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", pipeline_extra=dict(flow_shift=3.0)),
    "wan2.1-14b": RandomArch(
        "wan", "WanTransformer3DModel",
        dict(_WAN_COMMON, num_layers=40, num_attention_heads=40, ffn_dim=13824),
        "Wan-AI/Wan2.1-T2V-14B-Diffusers", pipeline_extra=dict(flow_shift=5.0)),
    "wan2.2-t2v-a14b": RandomArch(
        "wan", "WanTransformer3DModel",
        dict(_WAN_COMMON, num_layers=40, num_attention_heads=40, ffn_dim=13824),
        "Wan-AI/Wan2.2-T2V-A14B-Diffusers", experts=2,
        pipeline_extra=dict(flow_shift=12.0, boundary_ratio=0.875)),
}


def _arch(arch: str) -> RandomArch:
    key = arch[len("random:"):] if arch.startswith("random:") else arch
    try:
        return RANDOM_ARCHS[key]
    except KeyError:
        names = ", ".join(f"random:{k}" for k in RANDOM_ARCHS)
        raise ModelNotFoundError(f"unknown random architecture {arch!r}; known: {names}") from None


def transformer_config(arch: str) -> dict:
    """The transformer's constructor arguments for ``arch`` (``"wan2.1-1.3b"`` or ``"random:wan2.1-1.3b"``)."""
    return dict(_arch(arch).config)


def _transformer_class(arch: RandomArch):
    import diffusers

    return getattr(diffusers, arch.transformer_class)


def count_parameters(arch: str) -> int:
    """Parameter count of one transformer of ``arch``, built on the ``meta`` device (no memory used)."""
    a = _arch(arch)
    with torch.device("meta"):
        model = _transformer_class(a)(**a.config)
    return sum(p.numel() for p in model.parameters())


def _norm_types() -> tuple[type, ...]:
    types: list[type] = [nn.LayerNorm, nn.GroupNorm]
    if hasattr(nn, "RMSNorm"):
        types.append(nn.RMSNorm)
    try:
        from diffusers.models.normalization import RMSNorm

        types.append(RMSNorm)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_",
                   "dirac_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
                   "orthogonal_", "sparse_")


@contextlib.contextmanager
def _skip_default_init():
    """Make ``torch.nn.init`` functions no-ops while a module is constructed (weights are re-drawn)."""
    saved = {n: getattr(nn.init, n) for n in _INIT_FUNCTIONS if hasattr(nn.init, n)}
    try:
        for n in saved:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def _in_fp32(param_name: str, keep: list[str] | None) -> bool:
    # same rule as diffusers' loader: a component of the dotted name equals a kept module name
    return bool(keep) and any(k in param_name.split(".") for k in keep)


def _resolve(device, dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


@torch.no_grad()
def materialize_random_(model: nn.Module, device, dtype: torch.dtype, seed: int = 0,
                        std: float = 0.02) -> nn.Module:
    """Replace ``model``'s meta parameters by random ones created on ``device`` (in place).

    Weights ~ N(0, std), biases 0, norm weights 1; parameters under ``_keep_in_fp32_modules`` are
    float32 when ``dtype`` is a 16-bit type. Buffers move to ``device``; persistent float buffers
    (saved in checkpoints, e.g. SD3's positional table) are cast to ``dtype`` as ``from_pretrained``
    does, computed ones (rotary tables) keep their dtype.
    With ``device="meta"`` nothing is allocated.
    """
    device = torch.device(device)
    keep = getattr(model, "_keep_in_fp32_modules", None) if dtype in (torch.float16, torch.bfloat16) else None
    norms = _norm_types()
    generator = None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed)
    done: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) in done:  # tied parameter
                module._parameters[pname] = done[id(p)]
                continue
            full = f"{module_name}.{pname}" if module_name else pname
            dt = torch.float32 if _in_fp32(full, keep) else dtype
            t = torch.empty(p.shape, device=device, dtype=dt)
            if generator is not None:
                if pname == "bias":
                    t.zero_()
                elif isinstance(module, norms) and pname == "weight":
                    t.fill_(1.0)
                else:
                    t.normal_(0.0, std, generator=generator)
            new = nn.Parameter(t, requires_grad=p.requires_grad)
            module._parameters[pname] = new
            done[id(p)] = new
    for module_name, module in model.named_modules():
        for bname, b in list(module._buffers.items()):
            if b is None:
                continue
            full = f"{module_name}.{bname}" if module_name else bname
            # like from_pretrained: saved (persistent) float buffers come back in `dtype`,
            # computed (non-persistent) ones keep the dtype the constructor gave them
            persistent = bname not in module._non_persistent_buffers_set
            if b.is_floating_point() and persistent and not _in_fp32(full, keep):
                module._buffers[bname] = b.to(device=device, dtype=dtype)
            elif b.device != device:
                module._buffers[bname] = b.to(device)
    return model.eval()


def random_transformer(arch: str, device="cuda", dtype: torch.dtype | None = None, seed: int = 0,
                       **config_overrides):
    """The full-size transformer of ``arch`` with random weights, created directly on ``device``.

    ``arch``: a key of :data:`RANDOM_ARCHS` with or without the ``random:`` prefix
    (``"sd3.5-medium"``, ``"flux.1-dev"``, ``"wan2.1-1.3b"``, ``"wan2.1-14b"``, ...).
    ``dtype`` None: bfloat16 on CUDA, float32 elsewhere. ``device="meta"`` gives a shape-only model.
    ``config_overrides`` change config fields, e.g. ``num_layers=3`` for a layer stack of the
    published width (benchmarks that scale per-layer timings).
    """
    from accelerate import init_empty_weights

    a = _arch(arch)
    device, dtype = _resolve(device, dtype)
    # Parameters go to meta (each is briefly allocated, uninitialised, on `device` and dropped);
    # buffers (rope tables, SD3's sin-cos table) are computed on `device`.
    with torch.device(device), init_empty_weights(include_buffers=False), _skip_default_init():
        model = _transformer_class(a)(**{**a.config, **config_overrides})
    return materialize_random_(model, device, dtype, seed=seed)


def _small(module: nn.Module, device, dtype):
    # plain nn.Module.to: diffusers' override warns about (empty) fp32 module lists on every cast
    return nn.Module.to(module, device=device, dtype=dtype).eval()


def random_pipeline(arch: str, device="cuda", dtype: torch.dtype | None = None, seed: int = 0):
    """A diffusers pipeline (``StableDiffusion3Pipeline`` / ``FluxPipeline`` / ``WanPipeline``) whose
    transformer(s) are the full-size random ``arch`` and whose text encoders, tokenizers and VAE are
    small stand-ins with the interface widths the transformer expects (see the module docstring).
    """
    from mixdit.pipelines import tiny

    a = _arch(arch)
    device, dtype = _resolve(device, dtype)
    transformer = random_transformer(arch, device, dtype, seed=seed)
    torch.manual_seed(seed + 1)  # the small stand-ins are built on the CPU from a fixed seed
    if a.family == "sd3":
        from diffusers import StableDiffusion3Pipeline

        vae = tiny.make_image_vae(block_out_channels=(16, 16, 16, 16), sample_size=1024, **tiny.SD3_VAE_FACTORS)
        te1 = tiny.make_clip_text_encoder(768, 768, intermediate_size=64, num_heads=2, with_projection=True)
        te2 = tiny.make_clip_text_encoder(1280, 1280, intermediate_size=64, num_heads=2, with_projection=True)
        te3 = tiny.make_t5_encoder(a.config["joint_attention_dim"], num_heads=2, d_kv=64)
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=tiny.sd3_scheduler(), vae=_small(vae, device, dtype),
            text_encoder=_small(te1, device, dtype), tokenizer=tiny.make_clip_tokenizer(),
            text_encoder_2=_small(te2, device, dtype), tokenizer_2=tiny.make_clip_tokenizer(),
            text_encoder_3=_small(te3, device, dtype), tokenizer_3=tiny.make_t5_tokenizer(),
        )
    if a.family == "flux":
        from diffusers import FluxPipeline

        vae = tiny.make_image_vae(block_out_channels=(16, 16, 16, 16), sample_size=1024, **tiny.FLUX_VAE_FACTORS)
        te1 = tiny.make_clip_text_encoder(a.config["pooled_projection_dim"], None, intermediate_size=64,
                                          num_heads=2, with_projection=False)
        te2 = tiny.make_t5_encoder(a.config["joint_attention_dim"], num_heads=2, d_kv=64)
        return FluxPipeline(
            scheduler=tiny.flux_scheduler(), vae=_small(vae, device, dtype),
            text_encoder=_small(te1, device, dtype), tokenizer=tiny.make_clip_tokenizer(),
            text_encoder_2=_small(te2, device, dtype), tokenizer_2=tiny.make_t5_tokenizer(),
            transformer=transformer,
        )
    if a.family == "wan":
        from diffusers import WanPipeline

        extra = dict(a.pipeline_extra)
        te = tiny.make_t5_encoder(a.config["text_dim"], umt5=True, num_heads=2, d_kv=64)
        vae = tiny.make_wan_vae(base_dim=8)
        kwargs = dict(transformer=transformer, vae=_small(vae, device, dtype), text_encoder=_small(te, device, dtype),
                      tokenizer=tiny.make_t5_tokenizer(), scheduler=tiny.wan_scheduler(extra.pop("flow_shift")))
        if a.experts == 2:
            kwargs["transformer_2"] = random_transformer(arch, device, dtype, seed=seed + 1000)
            kwargs["boundary_ratio"] = extra.pop("boundary_ratio")
        return WanPipeline(**kwargs)
    raise AssertionError(a.family)  # pragma: no cover
