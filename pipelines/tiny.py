"""Tiny offline pipelines: real diffusers architectures, random weights, tokenizers built in code.

Nothing here touches the network. Each ``build_tiny_*`` function returns an ordinary diffusers
pipeline on the CPU in float32, with weights drawn from a fixed seed, so two calls give bitwise
identical weights. :func:`mixdit.pipelines.zoo.load_pipeline` saves them once into a cache folder
and always loads them back through ``DiffusionPipeline.from_pretrained`` (the real loading path).

Sizes (chosen so a 2-step generation takes about a second on a laptop CPU):

==============  ==================================================================================
``tiny-sd3``    SD3.5-style transformer (2 joint blocks, block 0 with dual attention, RMS qk-norm,
                4 heads x 8, patch 2), VAE 4x spatial / 16 latent channels. Default output 64x64
                (8x8 = 64 image tokens; text = 77 CLIP + ``max_sequence_length`` T5 tokens).
``tiny-flux``   FLUX.1-dev-style transformer (2 double + 2 single blocks, 2 heads x 16,
                guidance embeds), same VAE. Pass ``height=64, width=64`` (FluxPipeline's default
                size is 128 x the VAE factor): 8x8 = 64 packed image tokens.
``tiny-wan``    Wan 2.1-style transformer (2 blocks, 2 heads x 12, patch (1,2,2)), the Wan VAE
                (4x time, 8x space). ``height=64, width=64, num_frames=9`` -> latent 3x8x8 ->
                3x4x4 = 48 tokens.
``tiny-wan22``  Wan 2.2 A14B-style pair: ``transformer`` (high noise) and ``transformer_2`` (low
                noise, different seed), ``boundary_ratio=0.875``. With 2 UniPC steps (flow shift
                3) the first step runs ``transformer`` and the second ``transformer_2``.
==============  ==================================================================================

Tokenizers: a character-level CLIP BPE (the 256 byte-level characters, each also with ``</w>``,
plus ``<|startoftext|>``/``<|endoftext|>``, no merges; ``model_max_length=77``) and a
character-level T5 unigram tokenizer (printable ASCII + ``▁``, the T5 special tokens and the 100
``<extra_id_*>`` tokens), used for T5 and for Wan's UMT5.
"""

from __future__ import annotations

import torch

# Bump when any tiny architecture, weight draw or tokenizer changes: cached folders are rebuilt.
TINY_VERSION = 1

CLIP_MAX_LENGTH = 77


# --------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------
def clip_char_vocab() -> dict[str, int]:
    """Character-level CLIP vocabulary: 256 byte characters, the same with ``</w>``, start, end."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def make_clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH):
    """A character-level ``CLIPTokenizer`` (514 tokens, no merges) built without any file."""
    from transformers import CLIPTokenizer

    try:  # transformers >= 5: built from the vocabulary directly
        return CLIPTokenizer(vocab=clip_char_vocab(), merges=[], model_max_length=model_max_length)
    except TypeError:  # transformers 4.x: the class needs files; write them to a temporary folder
        import json
        import tempfile
        from pathlib import Path

        folder = Path(tempfile.mkdtemp(prefix="mixdit-clip-tok-"))
        (folder / "vocab.json").write_text(json.dumps(clip_char_vocab()))
        (folder / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"),
                             model_max_length=model_max_length)


def make_t5_tokenizer(model_max_length: int = 512):
    """A character-level T5 tokenizer (``T5TokenizerFast`` backed by a ``tokenizers`` unigram model).

    ids: 0 ``<pad>``, 1 ``</s>``, 2 ``<unk>``, 3 ``▁``, then ASCII 33..126, then the 100
    ``<extra_id_*>`` tokens (198 in all). Also used as Wan's UMT5 tokenizer.
    """
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(chr(c), -3.0) for c in range(33, 127)]
    try:  # transformers >= 5
        return T5TokenizerFast(vocab=vocab, model_max_length=model_max_length)
    except TypeError:  # transformers 4.x: from a `tokenizers.Tokenizer` object
        from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

        tok = Tokenizer(models.Unigram(vocab, unk_id=2))
        tok.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
        return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                               extra_ids=100, model_max_length=model_max_length)


def make_llama_tokenizer(model_max_length: int = 512):
    """A character-level Llama tokenizer (HunyuanVideo's text encoder): ``▁`` for spaces, ASCII 33..126, newline
    as ``<0x0A>``; the chat-template markers stay plain characters. Built without any file."""
    from transformers import LlamaTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "▁"])}
    for c in range(33, 127):
        vocab[chr(c)] = len(vocab)
    vocab["<0x0A>"] = len(vocab)
    try:  # transformers >= 5: a BPE without merges over these symbols
        return LlamaTokenizerFast(vocab=vocab, merges=[], model_max_length=model_max_length, pad_token="</s>")
    except TypeError:  # transformers 4.x: from a `tokenizers.Tokenizer` object
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

        tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tk.normalizer = normalizers.Replace(" ", "▁")
        tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
        tk.decoder = decoders.Replace("▁", " ")
        return LlamaTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="</s>", model_max_length=model_max_length)


# --------------------------------------------------------------------------------------------
# text encoders and VAEs (shared with random_models for the full-size stand-ins)
# --------------------------------------------------------------------------------------------
def make_clip_text_encoder(hidden_size: int, projection_dim: int | None, *, num_layers: int = 1,
                           intermediate_size: int = 37, num_heads: int = 4, with_projection: bool):
    """A small CLIP text encoder for the character-level CLIP tokenizer.

    ``with_projection=True`` gives ``CLIPTextModelWithProjection`` (SD3: pooled = text_embeds of
    size ``projection_dim``); ``False`` gives ``CLIPTextModel`` (FLUX: pooled = pooler_output of
    size ``hidden_size``).
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = clip_char_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=intermediate_size,
        projection_dim=projection_dim or hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="gelu",
        layer_norm_eps=1e-5, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def make_t5_encoder(d_model: int, *, umt5: bool = False, num_layers: int = 1, d_ff: int = 32,
                    num_heads: int = 4, d_kv: int = 8, vocab_size: int | None = None):
    """A small ``T5EncoderModel`` (or ``UMT5EncoderModel``) whose output width is ``d_model``."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    vocab_size = vocab_size or len(make_t5_tokenizer())
    kwargs = dict(vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
                  num_heads=num_heads, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                  feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                  decoder_start_token_id=0)
    if umt5:
        return UMT5EncoderModel(UMT5Config(**kwargs)).eval()
    return T5EncoderModel(T5Config(**kwargs)).eval()


def make_image_vae(*, scaling_factor: float, shift_factor: float, block_out_channels=(8, 16, 16),
                   latent_channels: int = 16, sample_size: int = 64):
    """A small ``AutoencoderKL`` (SD3/FLUX style: no quant convs) with ``2**(len(blocks)-1)``x downsampling."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels),
        layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4, sample_size=sample_size,
        scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False,
        use_post_quant_conv=False, mid_block_add_attention=True,
    ).eval()


def make_wan_vae(base_dim: int = 3):
    """A small ``AutoencoderKLWan``: 16 latent channels, 4x time / 8x space like the real one."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=base_dim, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


SD3_VAE_FACTORS = dict(scaling_factor=1.5305, shift_factor=0.0609)
FLUX_VAE_FACTORS = dict(scaling_factor=0.3611, shift_factor=0.1159)


def sd3_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def wan_scheduler(flow_shift: float = 3.0):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                   use_flow_sigmas=True, flow_shift=flow_shift)


# --------------------------------------------------------------------------------------------
# tiny transformer configs
# --------------------------------------------------------------------------------------------
TINY_SD3_TRANSFORMER = dict(
    sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
    pooled_projection_dim=64, out_channels=16, pos_embed_max_size=32, dual_attention_layers=(0,),
    qk_norm="rms_norm",
)
TINY_FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
    axes_dims_rope=(4, 4, 8),
)
TINY_WAN_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)

# the HunyuanVideo / CogVideoX transformers alone at test size (the attention features' unit tests); the built-in
# pipelines below use them with larger text / sample settings
TINY_HUNYUAN_VIDEO_TRANSFORMER = dict(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2, num_single_layers=1,
    num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
    pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
)
TINY_COGVIDEOX_TRANSFORMER = dict(
    num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2, text_embed_dim=8,
    num_layers=3, sample_width=16, sample_height=16, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
    max_text_seq_length=8,
)


def denoiser_inputs(model, batch: int, *, seed: int = 0, latent=None, text_len: int | None = None,
                    random_timesteps: bool = False, device=None, dtype=None) -> dict:
    """Random keyword inputs for one call of a diffusers DiT of any supported family (``model(**inputs)``,
    ``return_dict=False``): latents, text states (and pooled / ids / guidance where the family takes them) at
    the model's widths. ``latent``: the latent grid ((frames,) height, width; FLUX: tokens per side) before
    patchify, default a small one; ``random_timesteps``: one timestep per row instead of the middle of the
    schedule. HunyuanVideo gets a text mask with its last two tokens padded (keys the attention must skip).
    Drawn on the CPU (the same values on any device), then moved to ``device``; the latents and text states in
    ``dtype`` (timesteps, guidance and ids stay float32)."""
    inputs = _denoiser_inputs(model, batch, seed, latent, text_len, random_timesteps)
    for key, value in inputs.items():
        if torch.is_tensor(value):
            cast = dtype if key in ("hidden_states", "encoder_hidden_states", "pooled_projections") else None
            inputs[key] = value.to(device=device, dtype=cast)
    return inputs


def _denoiser_inputs(model, batch, seed, latent, text_len, random_timesteps) -> dict:
    from mixdit.pipelines.adapters import detect_family

    family = detect_family(model)
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(batch, generator=g) if random_timesteps else torch.full((batch,), 0.5)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    if family == "sd3":
        h, w = latent or (8, 8)
        return dict(hidden_states=randn(batch, cfg.in_channels, h, w),
                    encoder_hidden_states=randn(batch, text_len or 7, cfg.joint_attention_dim),
                    pooled_projections=randn(batch, cfg.pooled_projection_dim), timestep=1000 * t, return_dict=False)
    if family == "flux":
        side = (latent or (4,))[0]
        n_text = text_len or 6
        ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
        return dict(hidden_states=randn(batch, side * side, cfg.in_channels),
                    encoder_hidden_states=randn(batch, n_text, cfg.joint_attention_dim),
                    pooled_projections=randn(batch, cfg.pooled_projection_dim), timestep=t,
                    guidance=torch.full((batch,), 3.5), txt_ids=torch.zeros(n_text, 3),
                    img_ids=torch.cat([torch.zeros(side * side, 1), ids.float()], 1), return_dict=False)
    if family == "wan":
        f, h, w = latent or (3, 8, 8)
        return dict(hidden_states=randn(batch, cfg.in_channels, f, h, w), timestep=1000 * t,
                    encoder_hidden_states=randn(batch, text_len or 7, cfg.text_dim), return_dict=False)
    if family == "hunyuan_video":
        f, h, w = latent or (3, 4, 6)
        n_text = text_len or 6
        mask = torch.ones(batch, n_text, dtype=torch.bool)
        mask[:, n_text - 2:] = False
        return dict(hidden_states=randn(batch, cfg.in_channels, f, h, w), timestep=1000 * t,
                    encoder_hidden_states=randn(batch, n_text, cfg.text_embed_dim), encoder_attention_mask=mask,
                    pooled_projections=randn(batch, cfg.pooled_projection_dim),
                    guidance=torch.full((batch,), 3000.0), return_dict=False)
    # cogvideox: [B, frames, C, H, W]; its text length is fixed by max_text_seq_length
    f, h, w = latent or (3, 16, 16)
    return dict(hidden_states=randn(batch, f, cfg.in_channels, h, w),
                encoder_hidden_states=randn(batch, cfg.max_text_seq_length, cfg.text_embed_dim),
                timestep=(1000 * t).long(), return_dict=False)


def _seeded(seed: int):
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------
def build_tiny_sd3():
    """``StableDiffusion3Pipeline`` with a 2-block SD3.5-style transformer (64x64 images by default)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    _seeded(0)
    transformer = SD3Transformer2DModel(**TINY_SD3_TRANSFORMER).eval()
    _seeded(1)
    vae = make_image_vae(**SD3_VAE_FACTORS)
    _seeded(2)
    # pooled = 32 + 32 = pooled_projection_dim; CLIP hidden states 32 + 32 = 64 = T5 d_model = joint dim
    text_encoder = make_clip_text_encoder(32, 32, with_projection=True)
    _seeded(3)
    text_encoder_2 = make_clip_text_encoder(32, 32, with_projection=True)
    _seeded(4)
    text_encoder_3 = make_t5_encoder(64)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=sd3_scheduler(), vae=vae,
        text_encoder=text_encoder, tokenizer=make_clip_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=make_clip_tokenizer(),
        text_encoder_3=text_encoder_3, tokenizer_3=make_t5_tokenizer(),
    )


def build_tiny_flux():
    """``FluxPipeline`` with a FLUX.1-dev-style transformer (2 double + 2 single blocks)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    _seeded(0)
    transformer = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER).eval()
    _seeded(1)
    vae = make_image_vae(**FLUX_VAE_FACTORS)
    _seeded(2)
    text_encoder = make_clip_text_encoder(32, None, with_projection=False)  # pooled 32
    _seeded(3)
    text_encoder_2 = make_t5_encoder(32)  # joint_attention_dim 32
    return FluxPipeline(
        scheduler=flux_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=make_clip_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=make_t5_tokenizer(), transformer=transformer,
    )


def _wan_components():
    _seeded(1)
    vae = make_wan_vae()
    _seeded(2)
    text_encoder = make_t5_encoder(32, umt5=True)  # text_dim 32
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=make_t5_tokenizer(), scheduler=wan_scheduler())


def build_tiny_wan():
    """``WanPipeline`` with a 2-block Wan 2.1-style transformer (e.g. 9 frames at 64x64)."""
    from diffusers import WanPipeline, WanTransformer3DModel

    _seeded(0)
    transformer = WanTransformer3DModel(**TINY_WAN_TRANSFORMER).eval()
    return WanPipeline(transformer=transformer, **_wan_components())


def build_tiny_wan22():
    """``WanPipeline`` with two Wan 2.2-style experts: ``transformer`` (high noise, t >= 875) and
    ``transformer_2`` (low noise), ``boundary_ratio=0.875``."""
    from diffusers import WanPipeline, WanTransformer3DModel

    _seeded(0)
    transformer = WanTransformer3DModel(**TINY_WAN_TRANSFORMER).eval()
    _seeded(10)
    transformer_2 = WanTransformer3DModel(**TINY_WAN_TRANSFORMER).eval()
    return WanPipeline(transformer=transformer, transformer_2=transformer_2, boundary_ratio=0.875,
                       **_wan_components())


def build_tiny_cogvideox():
    """``CogVideoXPipeline`` with a 3-block transformer (64x64, 9 frames by default: latent 3 x 8 x 8) and a T5
    text encoder at the pipeline's default 226 text tokens."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    _seeded(0)
    transformer = CogVideoXTransformer3DModel(**dict(TINY_COGVIDEOX_TRANSFORMER, max_text_seq_length=226,
                                                     sample_width=8, sample_height=8)).eval()
    _seeded(1)
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4).eval()
    _seeded(2)
    text_encoder = make_t5_encoder(TINY_COGVIDEOX_TRANSFORMER["text_embed_dim"])
    return CogVideoXPipeline(tokenizer=make_t5_tokenizer(226), text_encoder=text_encoder, vae=vae,
                             transformer=transformer, scheduler=CogVideoXDDIMScheduler())


def build_tiny_hunyuan_video():
    """``HunyuanVideoPipeline`` with a 2 + 2-block transformer (64x64, 9 frames by default: latent 3 x 8 x 8), a
    3-layer Llama text encoder (its second-to-last layer is used) and a small CLIP for the pooled text."""
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import LlamaConfig, LlamaModel

    _seeded(0)
    transformer = HunyuanVideoTransformer3DModel(**dict(TINY_HUNYUAN_VIDEO_TRANSFORMER, num_single_layers=2)).eval()
    _seeded(1)
    vae = AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4,
                                    down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                    layers_per_block=1, act_fn="silu", norm_num_groups=4, scaling_factor=0.476986,
                                    spatial_compression_ratio=8, temporal_compression_ratio=4,
                                    mid_block_add_attention=True).eval()
    tokenizer = make_llama_tokenizer()
    _seeded(2)
    text_encoder = LlamaModel(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=TINY_HUNYUAN_VIDEO_TRANSFORMER["text_embed_dim"], intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024)).eval()
    _seeded(3)
    text_encoder_2 = make_clip_text_encoder(TINY_HUNYUAN_VIDEO_TRANSFORMER["pooled_projection_dim"], None,
                                            with_projection=False)
    return HunyuanVideoPipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2,
                                tokenizer_2=make_clip_tokenizer())


TINY_BUILDERS = {
    "tiny-sd3": build_tiny_sd3,
    "tiny-flux": build_tiny_flux,
    "tiny-wan": build_tiny_wan,
    "tiny-wan22": build_tiny_wan22,
    "tiny-hunyuan-video": build_tiny_hunyuan_video,
    "tiny-cogvideox": build_tiny_cogvideox,
}
