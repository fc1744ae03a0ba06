"""Testbed model configurations: :class:`TestbedConfig` and the :data:`PRESETS` (no torch, so the CLI can list
them without loading it; :mod:`mixdit.pipelines.testbed.models` builds the pipelines and re-exports these)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mixdit.errors import ConfigError


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
