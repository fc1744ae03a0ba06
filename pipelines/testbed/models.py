"""Testbed model configurations and the (untrained) diffusers pipelines built from them.

========================  ====================================================================
``video`` (Wan 2.1 arch)  13 frames x 64 x 64 -> codec (time 4x causal, space 1x) -> latent
                          [12, 4, 64, 64] -> patch (1, 2, 2) -> 4 x 32 x 32 = **4,096 video
                          tokens**. WanTransformer3DModel: 4 blocks, 4 heads x 64 (dim 256),
                          FFN 1024, text_dim 128 (a 2-layer UMT5 over the word tokenizer,
                          padded to WanPipeline's 512 text tokens). ~4.7 M parameters.
                          Sized so that 24 CFG steps run in under a minute on 2 CPU cores
                          (self-attention over 4,096 tokens is ~60% of the CPU time).
``image`` (SD3 arch)      64 x 64 -> codec (space 2x) -> latent [12, 32, 32] -> patch 2 ->
                          16 x 16 = 256 image tokens (+ 32 CLIP + 256 T5 text tokens, the
                          pipeline's default ``max_sequence_length``).
                          SD3Transformer2DModel: 3 joint blocks, 4 heads x 64 (dim 256), RMS
                          qk-norm; two 2-layer CLIP text encoders (128 + 128 = joint dim 256)
                          and a 1-layer T5 (d_model 256), all over the word tokenizer.
========================  ====================================================================

``mini-video`` / ``mini-image`` are the same architectures at toy size for CPU tests.
The codec's latent statistics (Wan ``latents_mean/std``, SD3 ``shift/scaling_factor``) are
measured on 256 rendered scenes with a fixed seed when a pipeline is built.
"""

from __future__ import annotations

import numpy as np
import torch

from mixdit.pipelines.testbed.config import PRESETS, TestbedConfig, preset, validate  # noqa: F401  (re-exported)

# The codec, scene renderer and text encoders (diffusers / transformers models) are imported where a
# pipeline is built; `mixdit --help` reads PRESETS and TestbedConfig from testbed.config (no torch).

TEXT_MAX_LENGTH = 32  # word tokens (captions use <= 12)
SD3_T5_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length (T5 tokens, padded)


def latent_statistics(config: TestbedConfig, count: int = 256, seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """Per-RGB-channel mean and std of rendered scenes in [-1, 1] (what the codec's channels carry)."""
    from mixdit.pipelines.testbed.scenes import render, sample_scenes

    scenes = sample_scenes(seed, count, video=config.kind == "video")
    x = render(scenes, config.height, 1) * 2 - 1  # first frames: colours and layout are the same in time
    x = x.double()
    return x.mean(dim=(0, 2, 3)).numpy(), x.std(dim=(0, 2, 3)).numpy()


def make_codec(config: TestbedConfig):
    from mixdit.pipelines.testbed.codec import PixelShuffleAutoencoder

    mean, std = latent_statistics(config)
    s2 = config.spatial_factor ** 2
    # pixel_unshuffle orders channels c * s^2 + offset; time slots are outermost
    per_channel_mean = [float(m) for _ in range(config.temporal_factor) for m in mean for _ in range(s2)]
    per_channel_std = [float(s) for _ in range(config.temporal_factor) for s in std for _ in range(s2)]
    return PixelShuffleAutoencoder(
        in_channels=3, spatial_factor=config.spatial_factor, temporal_factor=config.temporal_factor,
        latents_mean=per_channel_mean, latents_std=per_channel_std,
        scaling_factor=float(1.0 / std.mean()), shift_factor=float(mean.mean()))


def build_testbed_pipeline(config: TestbedConfig, seed: int | None = None):
    """A freshly initialised (untrained) ``WanPipeline`` or ``StableDiffusion3Pipeline`` for ``config``."""
    from mixdit.pipelines.testbed.text import make_clip_encoder, make_t5_encoder, make_umt5_encoder, make_word_tokenizer

    validate(config)
    seed = config.seed if seed is None else seed
    vae = make_codec(config)
    if config.kind == "video":
        from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**config.transformer)
        torch.manual_seed(seed + 1)
        text_encoder = make_umt5_encoder(**config.text_encoder)
        scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=config.sampling_shift)
        return WanPipeline(tokenizer=make_word_tokenizer(TEXT_MAX_LENGTH), text_encoder=text_encoder,
                           transformer=transformer, vae=vae, scheduler=scheduler)
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**config.transformer)
    torch.manual_seed(seed + 1)
    text_encoder = make_clip_encoder(max_length=TEXT_MAX_LENGTH, **config.text_encoder)
    torch.manual_seed(seed + 2)
    text_encoder_2 = make_clip_encoder(max_length=TEXT_MAX_LENGTH, **config.text_encoder)
    torch.manual_seed(seed + 3)
    t5 = dict(config.text_encoder_3 or {})
    text_encoder_3 = make_t5_encoder(d_model=config.transformer["joint_attention_dim"], **t5)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=config.sampling_shift)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=text_encoder, tokenizer=make_word_tokenizer(TEXT_MAX_LENGTH),
        text_encoder_2=text_encoder_2, tokenizer_2=make_word_tokenizer(TEXT_MAX_LENGTH),
        text_encoder_3=text_encoder_3, tokenizer_3=make_word_tokenizer(SD3_T5_LENGTH))


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def transformer_megabytes(config: TestbedConfig, bytes_per_param: int = 4) -> float:
    """Size of the denoiser's weights (fp32 by default) without building the whole pipeline."""
    with torch.device("meta"):
        if config.kind == "video":
            from diffusers import WanTransformer3DModel

            model = WanTransformer3DModel(**config.transformer)
        else:
            from diffusers import SD3Transformer2DModel

            model = SD3Transformer2DModel(**config.transformer)
    return parameter_count(model) * bytes_per_param / 1e6


def transformer_flops_per_sample(config: TestbedConfig, text_tokens: int | None = None) -> float:
    """Rough forward FLOPs of the denoiser per sample: 2 x params x tokens for the linear layers plus
    4 x S x S_kv x dim per attention (used for the GPU-time estimate)."""
    t = config.transformer
    dim = t["num_attention_heads"] * t["attention_head_dim"]
    s = config.num_visual_tokens
    params = transformer_megabytes(config) * 1e6 / 4
    if config.kind == "video":
        text_tokens = 512 if text_tokens is None else text_tokens
        attn = t["num_layers"] * (4 * s * s * dim + 4 * s * text_tokens * dim)
        return 2 * params * s + attn
    text_tokens = TEXT_MAX_LENGTH + SD3_T5_LENGTH if text_tokens is None else text_tokens
    n = s + text_tokens
    return 2 * params * n + t["num_layers"] * 4 * n * n * dim


__all__ = ["TestbedConfig", "PRESETS", "preset", "build_testbed_pipeline", "make_codec", "latent_statistics",
           "transformer_megabytes", "transformer_flops_per_sample"]
