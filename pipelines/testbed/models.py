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

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from mixdit.errors import ConfigError

# The codec, scene renderer and text encoders (diffusers / transformers models) are imported where a
# pipeline is built: `mixdit --help` reads PRESETS and TestbedConfig from here (6.6 -> ~2 s).

TEXT_MAX_LENGTH = 32  # word tokens (captions use <= 12)
SD3_T5_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length (T5 tokens, padded)


@dataclass
class TestbedConfig:
    """Everything that defines one testbed model and its training run (written next to the weights)."""

    __test__ = False  # not a pytest class

    kind: str  # "video" (WanPipeline) | "image" (StableDiffusion3Pipeline)
    height: int
    width: int
    num_frames: int  # 1 for images; 4n+1 for videos
    spatial_factor: int
    temporal_factor: int
    transformer: dict
    text_encoder: dict
    text_encoder_3: dict | None = None  # image models: the small T5 (d_model = joint_attention_dim)
    flow_shift: float = 3.0  # training noise levels (shifted logit-normal) and, unless sample_flow_shift, the sampler's
    sample_flow_shift: float | None = None  # the saved scheduler's shift (None: flow_shift)
    # training
    batch_size: int = 16
    learning_rate: float = 3e-4
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    # A share of each batch draws its noise level uniformly from [high_noise_min, 1). Solid shapes on flat
    # backgrounds stay readable from the noisy input up to sigma ~0.98 (a probe of the trained video model
    # recovered the true motion there whatever the caption said), and the shifted logit-normal almost never
    # goes above it (0.02% of samples past 0.99 at shift 3): the caption's motion words never paid off in
    # training, while sampling decides the motion in exactly that band.
    high_noise_fraction: float = 0.0
    high_noise_min: float = 0.96
    train_text_encoder: bool = True
    seed: int = 0
    # inference defaults (stored with the weights, read by load_testbed)
    default_steps: int = 30
    default_guidance_scale: float = 4.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TestbedConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def sampling_shift(self) -> float:
        return self.flow_shift if self.sample_flow_shift is None else self.sample_flow_shift

    @property
    def latent_shape(self) -> tuple[int, ...]:
        c = 3 * self.spatial_factor ** 2 * self.temporal_factor
        h, w = self.height // self.spatial_factor, self.width // self.spatial_factor
        if self.kind == "video":
            return (c, (self.num_frames - 1) // self.temporal_factor + 1, h, w)
        return (c, h, w)

    @property
    def num_visual_tokens(self) -> int:
        p = self.transformer["patch_size"]
        p = p if isinstance(p, (list, tuple)) else (1, p, p)
        shape = self.latent_shape
        t = shape[1] // p[0] if self.kind == "video" else 1
        return t * (shape[-2] // p[-2]) * (shape[-1] // p[-1])


def _wan_transformer(layers, heads, head_dim, ffn, text_dim, channels):
    return dict(patch_size=[1, 2, 2], num_attention_heads=heads, attention_head_dim=head_dim, in_channels=channels,
                out_channels=channels, text_dim=text_dim, freq_dim=256, ffn_dim=ffn, num_layers=layers,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def _sd3_transformer(layers, heads, head_dim, joint_dim, pooled_dim, channels, sample_size):
    return dict(sample_size=sample_size, patch_size=2, in_channels=channels, out_channels=channels,
                num_layers=layers, attention_head_dim=head_dim, num_attention_heads=heads,
                joint_attention_dim=joint_dim, caption_projection_dim=heads * head_dim,
                pooled_projection_dim=pooled_dim, pos_embed_max_size=64, qk_norm="rms_norm")


PRESETS: dict[str, TestbedConfig] = {
    "video": TestbedConfig(
        kind="video", height=64, width=64, num_frames=13, spatial_factor=1, temporal_factor=4,
        transformer=_wan_transformer(4, 4, 64, 1024, 128, 12),
        text_encoder=dict(d_model=128, num_layers=2, num_heads=4, d_ff=256),
        # sampler: shift 16 spends a quarter of the steps above sigma 0.98, where the motion is decided; 24 steps
        # keep a CPU generation under a minute (30 steps: shape 0.98 instead of 0.90, benchmarks/NOTES.md)
        flow_shift=3.0, high_noise_fraction=0.25, sample_flow_shift=16.0, batch_size=32, learning_rate=3e-4,
        default_steps=24, default_guidance_scale=4.0),
    "image": TestbedConfig(
        kind="image", height=64, width=64, num_frames=1, spatial_factor=2, temporal_factor=1,
        transformer=_sd3_transformer(3, 4, 64, 256, 256, 12, 32),
        text_encoder=dict(hidden_size=128, projection_dim=128, num_layers=2, num_heads=4, intermediate_size=256),
        text_encoder_3=dict(num_layers=1, num_heads=4, d_ff=256), flow_shift=2.0, batch_size=64, learning_rate=3e-4, default_steps=30, default_guidance_scale=4.0),
    "mini-video": TestbedConfig(
        kind="video", height=32, width=32, num_frames=5, spatial_factor=1, temporal_factor=4,
        transformer=_wan_transformer(2, 2, 16, 64, 32, 12),
        text_encoder=dict(d_model=32, num_layers=1, num_heads=2, d_ff=64),
        flow_shift=3.0, batch_size=4, learning_rate=1e-3, warmup_steps=5, ema_decay=0.9, default_steps=4),
    "mini-image": TestbedConfig(
        kind="image", height=32, width=32, num_frames=1, spatial_factor=2, temporal_factor=1,
        transformer=_sd3_transformer(2, 2, 16, 64, 64, 12, 16),
        text_encoder=dict(hidden_size=32, projection_dim=32, num_layers=2, num_heads=2, intermediate_size=64),
        text_encoder_3=dict(num_layers=1, num_heads=2, d_ff=64), flow_shift=2.0, batch_size=8, learning_rate=1e-3, warmup_steps=5, ema_decay=0.9, default_steps=4),
}


def preset(name: str, **overrides) -> TestbedConfig:
    if name not in PRESETS:
        raise ConfigError("testbed.model", name, "one of " + ", ".join(PRESETS))
    config = dataclasses.replace(PRESETS[name])
    config.transformer = dict(config.transformer)
    config.text_encoder = dict(config.text_encoder)
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    validate(config)
    return config


def validate(config: TestbedConfig) -> None:
    if config.kind not in ("video", "image"):
        raise ConfigError("testbed.kind", config.kind, "video or image")
    if config.kind == "video" and (config.num_frames - 1) % config.temporal_factor:
        raise ConfigError("testbed.num_frames", config.num_frames, f"{config.temporal_factor}n+1 frames")
    if config.kind == "image" and (config.num_frames != 1 or config.temporal_factor != 1):
        raise ConfigError("testbed.num_frames", config.num_frames, "1 for an image model (temporal_factor 1)")
    if config.height % 16 or config.width % 16:
        raise ConfigError("testbed.height/width", (config.height, config.width), "multiples of 16")
    if config.batch_size < 1:
        raise ConfigError("testbed.batch_size", config.batch_size, "an integer >= 1")
    if not 0.0 <= config.high_noise_fraction <= 1.0:
        raise ConfigError("testbed.high_noise_fraction", config.high_noise_fraction, "a number in [0, 1]")
    if not 0.0 <= config.high_noise_min < 1.0:
        raise ConfigError("testbed.high_noise_min", config.high_noise_min, "a number in [0, 1)")
    if config.sampling_shift <= 0:
        raise ConfigError("testbed.sample_flow_shift", config.sampling_shift, "a positive number")


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
