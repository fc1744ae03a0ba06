"""One small adapter per model family: where the self-attention modules are, how layers are
numbered, how tokens are laid out, and how to read the latent grid from a denoiser call.

Features ask the adapter; they never test model classes themselves.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from mixdit.errors import UnsupportedModelError


@dataclass(frozen=True)
class AttentionSite:
    """One self-attention module a feature may patch."""

    layer_index: int  # the family's documented layer number (see each adapter)
    name: str  # module path inside the denoiser, e.g. "blocks.3.attn1"
    module: torch.nn.Module
    kind: str  # "joint" (text in the sequence), "self" (visual tokens only), "single" (FLUX/Hunyuan single-stream)


class FamilyAdapter:
    family: str = ""
    transformer_class: str = ""
    text_position: str = "none"  # "before" | "after" | "cross"
    is_video: bool = False

    # -- denoisers -------------------------------------------------------------------------
    @staticmethod
    def denoisers(pipe_or_model) -> list[tuple[str, torch.nn.Module]]:
        """(attribute name, module) for every denoiser (Wan 2.2 has two experts)."""
        if isinstance(pipe_or_model, torch.nn.Module):
            return [("transformer", uncompiled(pipe_or_model))]
        out = []
        for name in ("transformer", "transformer_2"):
            model = getattr(pipe_or_model, name, None)
            if model is not None:
                out.append((name, uncompiled(model)))
        return out

    # -- layers ----------------------------------------------------------------------------
    def attention_sites(self, model) -> list[AttentionSite]:
        raise NotImplementedError

    def num_layers(self, model) -> int:
        return len(self.attention_sites(model))

    def heads(self, model) -> int:
        return self.attention_sites(model)[0].module.heads

    # -- token layout ----------------------------------------------------------------------
    def grid(self, model, args: tuple, kwargs: dict) -> tuple[int, int, int]:
        """Latent grid after patchify, (frames, height, width), from the denoiser's inputs."""
        raise NotImplementedError

    def text_len(self, model, args: tuple, kwargs: dict) -> int:
        ehs = _arg(args, kwargs, "encoder_hidden_states", self._ehs_pos)
        return 0 if ehs is None or self.text_position == "cross" else int(ehs.shape[1])

    _ehs_pos = 1  # positional index of encoder_hidden_states in the denoiser's forward

    # -- batch rows and blocks (used by features that add rows, e.g. perturbation guidance) --------
    # forward arguments of the denoiser holding one entry per batch row (expanded when rows are added)
    row_args: tuple[str, ...] = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                                 "guidance", "encoder_hidden_states_image", "encoder_attention_mask")
    # arguments of each block holding one entry per batch row
    block_row_args: tuple[str, ...] = ("hidden_states", "encoder_hidden_states", "temb")

    def blocks(self, model) -> list[tuple[int, torch.nn.Module]]:
        """(layer index, block module) in execution order: the block that holds each attention site."""
        return [(s.layer_index, model.get_submodule(s.name.rsplit(".", 1)[0])) for s in self.attention_sites(model)]

    def row_roles(self, pipe, denoiser_name: str, batch_size: int, call_name: str | None
                      ) -> tuple[tuple[str, ...], float]:
        """Roles of the rows of one denoiser call made by this family's diffusers pipeline, and the
        classifier-free guidance scale the pipeline will apply to the ``cond`` rows (1.0 = none).

        ``pipe`` is None for a bare denoiser call; ``call_name`` is the pipeline's
        ``cache_context`` name (``"cond"``/``"uncond"``) when it sets one."""
        if call_name == "uncond":
            return ("uncond",) * batch_size, 1.0
        return ("cond",) * batch_size, 1.0

    def timestep(self, args: tuple, kwargs: dict) -> float | None:
        t = kwargs.get("timestep")
        if t is None:
            return None
        t = t.flatten()[0] if torch.is_tensor(t) else t
        return float(t)


def _arg(args, kwargs, name, pos):
    if name in kwargs:
        return kwargs[name]
    return args[pos] if len(args) > pos else None


def _pipeline_call_locals(pipe) -> dict:
    """Local variables of ``pipe.__call__`` when it is running up the stack (for settings a pipeline
    keeps only as locals, e.g. FLUX's ``true_cfg_scale``); {} otherwise."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "__call__" and frame.f_locals.get("self") is pipe:
            return dict(frame.f_locals)
        frame = frame.f_back
    return {}


def _cfg_batch_roles(batch_size: int) -> tuple[str, ...]:
    """Roles of a CFG batch that a pipeline concatenates as [uncond rows, cond rows] (SD3, CogVideoX)."""
    half = batch_size // 2
    return ("uncond",) * half + ("cond",) * half


def _true_cfg_row_roles(pipe, batch_size: int, call_name: str | None) -> tuple[tuple[str, ...], float]:
    """Guidance-distilled pipelines (FluxPipeline, HunyuanVideoPipeline) call the transformer for "cond", then,
    with true CFG only (``true_cfg_scale > 1`` and a negative prompt), again for "uncond"; they keep
    ``do_true_cfg`` and ``true_cfg_scale`` as locals of ``__call__``."""
    if call_name == "uncond":
        return ("uncond",) * batch_size, 1.0
    scale = 1.0
    if pipe is not None:
        local = _pipeline_call_locals(pipe)
        if local.get("do_true_cfg"):
            scale = float(local.get("true_cfg_scale", 1.0))
    return ("cond",) * batch_size, scale


def _dual_then_single_sites(model) -> list[AttentionSite]:
    """FLUX / HunyuanVideo numbering: the dual-stream blocks, then the single-stream blocks, as one index."""
    double = list(_sites(model.transformer_blocks, "attn", "joint", "transformer_blocks"))
    single = list(_sites(model.single_transformer_blocks, "attn", "single", "single_transformer_blocks",
                         start=len(double)))
    return double + single


def _sites(blocks, attr: str, kind: str, prefix: str, start: int = 0) -> Iterator[AttentionSite]:
    for i, block in enumerate(blocks):
        yield AttentionSite(start + i, f"{prefix}.{i}.{attr}", getattr(block, attr), kind)


class SD3Adapter(FamilyAdapter):
    """SD3 / SD3.5: layer i = joint block i (``transformer_blocks[i].attn``); sequence = [image, text]."""

    family, transformer_class, text_position = "sd3", "SD3Transformer2DModel", "after"

    def attention_sites(self, model):
        n = len(model.transformer_blocks)
        # the last SD3 block is context_pre_only: text still enters its joint attention
        return list(_sites(model.transformer_blocks, "attn", "joint", "transformer_blocks")) if n else []

    def grid(self, model, args, kwargs):
        x = _arg(args, kwargs, "hidden_states", 0)
        p = model.config.patch_size
        return (1, x.shape[-2] // p, x.shape[-1] // p)

    def row_roles(self, pipe, denoiser_name, batch_size, call_name):
        # StableDiffusion3Pipeline batches [uncond, cond] when it applies CFG (guidance_scale > 1)
        if pipe is not None and getattr(pipe, "do_classifier_free_guidance", False) and batch_size % 2 == 0:
            return _cfg_batch_roles(batch_size), float(pipe.guidance_scale)
        return ("cond",) * batch_size, 1.0


class FluxAdapter(FamilyAdapter):
    """FLUX.1: layers 0..18 = double-stream blocks, 19..56 = single-stream blocks; sequence = [text, image]."""

    family, transformer_class, text_position = "flux", "FluxTransformer2DModel", "before"

    def attention_sites(self, model):
        return _dual_then_single_sites(model)

    def grid(self, model, args, kwargs):
        img_ids = kwargs.get("img_ids")
        x = _arg(args, kwargs, "hidden_states", 0)
        if img_ids is None:
            return (1, 1, x.shape[1])
        ids = img_ids[-1] if img_ids.ndim == 2 else img_ids[0, -1]
        # packed latents are raster ordered: the last token holds the largest (row, col)
        h, w = int(ids[1]) + 1, int(ids[2]) + 1
        return (1, h, w) if h * w == x.shape[1] else (1, 1, x.shape[1])

    def row_roles(self, pipe, denoiser_name, batch_size, call_name):
        return _true_cfg_row_roles(pipe, batch_size, call_name)


class WanAdapter(FamilyAdapter):
    """Wan 2.1/2.2: layer i = ``blocks[i].attn1`` (video self-attention); text enters through cross-attention."""

    family, transformer_class, text_position, is_video = "wan", "WanTransformer3DModel", "cross", True
    _ehs_pos = 2

    def attention_sites(self, model):
        return list(_sites(model.blocks, "attn1", "self", "blocks"))

    def grid(self, model, args, kwargs):
        x = _arg(args, kwargs, "hidden_states", 0)
        pt, ph, pw = model.config.patch_size
        return (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)

    def row_roles(self, pipe, denoiser_name, batch_size, call_name):
        # WanPipeline calls the current expert for "cond", then (CFG only) for "uncond"
        if call_name == "uncond":
            return ("uncond",) * batch_size, 1.0
        scale = 1.0
        if pipe is not None and getattr(pipe, "do_classifier_free_guidance", False):
            scale = getattr(pipe, "_guidance_scale", 1.0)
            if denoiser_name == "transformer_2" and getattr(pipe, "_guidance_scale_2", None) is not None:
                scale = pipe._guidance_scale_2
        return ("cond",) * batch_size, float(scale)


class HunyuanVideoAdapter(FamilyAdapter):
    """HunyuanVideo: layers = dual-stream blocks then single-stream blocks; sequence = [video, text]."""

    family, transformer_class, text_position, is_video = "hunyuan_video", "HunyuanVideoTransformer3DModel", "after", True
    _ehs_pos = 2
    # its blocks also take the per-row text mask the forward builds from encoder_attention_mask
    block_row_args = FamilyAdapter.block_row_args + ("attention_mask",)

    def row_roles(self, pipe, denoiser_name, batch_size, call_name):
        return _true_cfg_row_roles(pipe, batch_size, call_name)

    def attention_sites(self, model):
        return _dual_then_single_sites(model)

    def grid(self, model, args, kwargs):
        x = _arg(args, kwargs, "hidden_states", 0)
        p, pt = model.config.patch_size, model.config.patch_size_t
        return (x.shape[2] // pt, x.shape[3] // p, x.shape[4] // p)


def _cogvideox_cfg_scale(pipe, local: dict) -> float:
    """The CFG scale CogVideoX pipelines apply to this step's prediction. With ``use_dynamic_cfg`` they compute it
    only after the transformer call, so it is computed here by their formula from the same locals (every CogVideoX
    pipeline of diffusers 0.42 uses it); otherwise ``pipe._guidance_scale``."""
    if local.get("use_dynamic_cfg") and all(k in local for k in ("guidance_scale", "num_inference_steps", "t")):
        n, t = local["num_inference_steps"], local["t"]
        t = float(t.item() if isinstance(t, torch.Tensor) else t)
        return 1.0 + float(local["guidance_scale"]) * (1.0 - math.cos(math.pi * ((n - t) / n) ** 5.0)) / 2.0
    return float(getattr(pipe, "_guidance_scale", 1.0))


class CogVideoXAdapter(FamilyAdapter):
    """CogVideoX: layer i = ``transformer_blocks[i].attn1``; sequence = [text, video]."""

    family, transformer_class, text_position, is_video = "cogvideox", "CogVideoXTransformer3DModel", "before", True

    def attention_sites(self, model):
        return list(_sites(model.transformer_blocks, "attn1", "joint", "transformer_blocks"))

    def row_roles(self, pipe, denoiser_name, batch_size, call_name):
        # CogVideoXPipeline batches [uncond, cond] when it applies CFG (a local: guidance_scale > 1).
        if pipe is not None and batch_size % 2 == 0:
            local = _pipeline_call_locals(pipe)
            if local.get("do_classifier_free_guidance"):
                return _cfg_batch_roles(batch_size), _cogvideox_cfg_scale(pipe, local)
        return ("cond",) * batch_size, 1.0

    def grid(self, model, args, kwargs):
        x = _arg(args, kwargs, "hidden_states", 0)  # [B, F, C, H, W]
        p, pt = model.config.patch_size, model.config.patch_size_t or 1
        return ((x.shape[1] + pt - 1) // pt, x.shape[3] // p, x.shape[4] // p)


ADAPTERS: dict[str, FamilyAdapter] = {a.family: a for a in
                                      (SD3Adapter(), FluxAdapter(), WanAdapter(), HunyuanVideoAdapter(), CogVideoXAdapter())}
SUPPORTED_FAMILIES = tuple(ADAPTERS)


def uncompiled(model):
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) compiles, else ``model``: mixdit patches the real
    denoiser, whose hooked forward and processors the wrapper then compiles (with a graph break at each)."""
    orig = getattr(model, "_orig_mod", None)
    return orig if isinstance(orig, torch.nn.Module) and type(model).__name__ == "OptimizedModule" else model


def adapter_for(pipe_or_model: Any) -> FamilyAdapter:
    """The adapter for a diffusers pipeline (its ``transformer``, else ``transformer_2``) or a bare
    denoiser; subclasses count as their diffusers base class. A clear error for anything else."""
    import diffusers

    model = pipe_or_model
    if not isinstance(pipe_or_model, torch.nn.Module):
        model = getattr(pipe_or_model, "transformer", None)
        if model is None:
            model = getattr(pipe_or_model, "transformer_2", None)
    model = uncompiled(model)
    for adapter in ADAPTERS.values():
        cls = getattr(diffusers, adapter.transformer_class, None)
        if cls is not None and isinstance(model, cls):
            return adapter
    what = type(model).__name__ if model is not None else f"{type(pipe_or_model).__name__} without a transformer"
    supported = ", ".join(f"{a.family} ({a.transformer_class})" for a in ADAPTERS.values())
    raise UnsupportedModelError(f"mixdit does not support {what}; supported model families: {supported}")


def detect_family(pipe_or_model: Any) -> str:
    return adapter_for(pipe_or_model).family
