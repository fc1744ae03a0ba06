"""The model zoo: tiny offline pipelines, the cache folder round trip, errors, dtype/device, families,
full-size random architectures (checked on the meta device only)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from mixdit.errors import ConfigError, ModelNotFoundError, UnsupportedModelError
from mixdit.pipelines import random_models, tiny, zoo
from mixdit.pipelines.tiny import denoiser_inputs
from mixdit.pipelines.zoo import (
    BUILTIN_MODELS, builtin_cache_dir, detect_family, list_builtin_models, load_pipeline, resolve_device,
    resolve_dtype,
)

TINY = ["tiny-sd3", "tiny-flux", "tiny-wan", "tiny-wan22", "tiny-hunyuan-video", "tiny-cogvideox"]
FAMILY = {"tiny-sd3": "sd3", "tiny-flux": "flux", "tiny-wan": "wan", "tiny-wan22": "wan",
          "tiny-hunyuan-video": "hunyuan_video", "tiny-cogvideox": "cogvideox"}
VIDEO = ("tiny-wan", "tiny-wan22", "tiny-hunyuan-video", "tiny-cogvideox")


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """A fresh cache for this module: the first load of each tiny model builds and saves it.

    Also one intra-op thread: the tiny models gain nothing from more, and on a busy shared CPU
    OpenMP spinning made a 2-step generation 20x slower.
    """
    old = os.environ.get("MIXDIT_CACHE")
    path = tmp_path_factory.mktemp("mixdit-cache")
    os.environ["MIXDIT_CACHE"] = str(path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield path
    torch.set_num_threads(threads)
    if old is None:
        os.environ.pop("MIXDIT_CACHE", None)
    else:
        os.environ["MIXDIT_CACHE"] = old


def _generate(pipe, name, seed=0):
    kwargs = dict(num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(seed))
    if name == "tiny-sd3":  # its default size is 64x64
        return pipe("a red ball", **kwargs).images
    if name in VIDEO:
        return pipe("a red ball", height=64, width=64, num_frames=9, **kwargs).frames
    return pipe("a red ball", height=64, width=64, **kwargs).images


@pytest.mark.parametrize("name", TINY)
def test_tiny_generates_deterministically(name):
    pipe = load_pipeline(name)
    assert pipe.mixdit_model_name == name
    experts = ["transformer", "transformer_2"] if name == "tiny-wan22" else ["transformer"]
    calls = dict.fromkeys(experts, 0)
    hooks = [getattr(pipe, k).register_forward_hook(lambda *a, k=k: calls.__setitem__(k, calls[k] + 1))
             for k in experts]
    a = _generate(pipe, name, seed=0)
    for h in hooks:
        h.remove()
    b = _generate(pipe, name, seed=0)
    expected = (1, 9, 64, 64, 3) if name in VIDEO else (1, 64, 64, 3)
    assert a.shape == expected
    assert (a == b).all()
    assert a.std() > 0  # not a constant image
    if name == "tiny-sd3":
        assert not (a == _generate(pipe, name, seed=1)).all()
    if name == "tiny-wan22":  # 2 UniPC steps straddle boundary_ratio=0.875: one step per expert
        assert pipe.config.boundary_ratio == 0.875
    assert all(n > 0 for n in calls.values()), calls


# latent grid and text length of each tiny model's transformer inputs (CogVideoX: its fixed 226 text tokens)
_INPUT_SIZES = {"tiny-sd3": dict(latent=(16, 16), text_len=12), "tiny-flux": dict(latent=(8,), text_len=12),
                "tiny-wan": dict(latent=(3, 8, 8), text_len=12), "tiny-wan22": dict(latent=(3, 8, 8), text_len=12),
                "tiny-hunyuan-video": dict(latent=(3, 8, 8), text_len=12), "tiny-cogvideox": dict(latent=(3, 8, 8))}


def _transformer_inputs(name, transformer):
    inputs = denoiser_inputs(transformer, 1, seed=123, **_INPUT_SIZES[name])
    inputs.pop("return_dict")
    return inputs


@pytest.mark.parametrize("name", TINY)
def test_saved_folder_loads_bitwise_with_plain_diffusers(name):
    """The cache folder, read by plain ``DiffusionPipeline.from_pretrained``, holds bitwise the weights
    of an independent in-memory build, and runs bitwise like the pipeline ``load_pipeline`` returns.

    (The in-memory build itself can differ from a loaded copy by ~1 ulp on the forward pass: safetensors
    tensors are not 64-byte aligned, which changes the CPU SIMD path; weights are bitwise equal.)
    """
    from diffusers import DiffusionPipeline

    ours = load_pipeline(name)  # makes sure the cache folder exists
    folder = builtin_cache_dir(name)
    plain = DiffusionPipeline.from_pretrained(folder)  # plain diffusers, nothing from mixdit
    fresh = tiny.TINY_BUILDERS[name]()  # an independent build from the same seeds
    keys = ["transformer"] + (["transformer_2"] if name == "tiny-wan22" else [])
    for key in keys:
        a, b = getattr(plain, key).state_dict(), getattr(fresh, key).state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{key}.{k} differs"
        with torch.no_grad():
            inputs = _transformer_inputs(name, getattr(plain, key))
            out_plain = getattr(plain, key)(**inputs, return_dict=False)[0]
            out_ours = getattr(ours, key)(**inputs, return_dict=False)[0]
            out_fresh = getattr(fresh, key)(**inputs, return_dict=False)[0]
        assert torch.equal(out_plain, out_ours)
        torch.testing.assert_close(out_plain, out_fresh, rtol=1e-5, atol=1e-5)
    # text encoders and VAE too
    for key in ("text_encoder", "vae"):
        sa, sb = getattr(plain, key).state_dict(), getattr(fresh, key).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cache_is_rebuilt_when_corrupt(cache_dir):
    folder = builtin_cache_dir("tiny-flux")
    load_pipeline("tiny-flux")
    reference = {k: v.clone() for k, v in load_pipeline("tiny-flux").transformer.state_dict().items()}
    weights = next((folder / "transformer").glob("*.safetensors"))
    data = weights.read_bytes()
    weights.unlink()  # new inode: pipelines already loaded keep their memory-mapped weights
    weights.write_bytes(data[:100])  # truncated file, marker still valid
    pipe = load_pipeline("tiny-flux")
    assert all(torch.equal(pipe.transformer.state_dict()[k], v) for k, v in reference.items())
    (folder / zoo.MARKER_FILE).unlink()  # missing marker: rebuilt too
    shutil.rmtree(folder / "vae")
    pipe = load_pipeline("tiny-flux")
    assert (folder / zoo.MARKER_FILE).is_file() and (folder / "vae").is_dir()
    assert not list(folder.parent.glob(".tmp-*"))


def test_local_folder_loads():
    folder = builtin_cache_dir("tiny-wan")
    load_pipeline("tiny-wan")
    pipe = load_pipeline(str(folder))
    assert type(pipe).__name__ == "WanPipeline" and detect_family(pipe) == "wan"


# ---------------------------------------------------------------------------------------------- errors
def test_unknown_name_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as info:
        load_pipeline("tiny-sd4")
    msg = str(info.value)
    assert "not a built-in name" in msg and "not a local folder" in msg and "tiny-sd4" in msg
    assert "Did you mean 'tiny-sd3'" in msg
    for name in TINY + ["random:wan2.1-1.3b"]:
        assert name in msg
    assert info.value.__cause__ is not None


def test_unknown_hub_id_single_attempt(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelNotFoundError) as info:
        load_pipeline("nobody-xyz/no-such-model")
    assert "hub load of 'nobody-xyz/no-such-model' failed" in str(info.value)
    assert "tiny-sd3" in str(info.value) and info.value.__cause__ is not None


@pytest.mark.parametrize("name", ["./no/such/folder", "/no/such/folder", "~/no-such-folder-xyz", "a/b/c"])
def test_missing_folder(name):
    with pytest.raises(ModelNotFoundError) as info:
        load_pipeline(name)
    assert "folder not found" in str(info.value) and "tiny-wan22" in str(info.value)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_unknown_random_arch():
    with pytest.raises(ModelNotFoundError, match="random:sd3.5-medium"):
        load_pipeline("random:sd9")


def test_folder_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a loadable diffusers pipeline"):
        load_pipeline(str(tmp_path))


# ---------------------------------------------------------------------------------------------- dtype/device
@pytest.mark.parametrize("value, expected", [
    ("float32", torch.float32), ("fp32", torch.float32), ("bfloat16", torch.bfloat16), ("BF16", torch.bfloat16),
    ("float16", torch.float16), ("fp16", torch.float16), (torch.float16, torch.float16),
    ("torch.bfloat16", torch.bfloat16),
])
def test_resolve_dtype(value, expected):
    assert resolve_dtype(value, "cpu") == expected


def test_resolve_dtype_defaults_and_errors():
    assert resolve_dtype(None, "cpu") == torch.float32
    for bad in ("float8", "int8", torch.int64, 3):
        with pytest.raises(ConfigError) as info:
            resolve_dtype(bad, "cpu")
        assert info.value.field == "dtype" and "bf16" in str(info.value)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError):
        resolve_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_load_with_dtype_string():
    pipe = load_pipeline("tiny-sd3", dtype="bf16")
    assert pipe.transformer.dtype == torch.bfloat16
    with pytest.raises(ConfigError):
        load_pipeline("tiny-sd3", dtype="bogus")


# ---------------------------------------------------------------------------------------------- families
@pytest.mark.parametrize("name", TINY)
def test_detect_family(name):
    pipe = load_pipeline(name)
    assert detect_family(pipe) == FAMILY[name]
    assert detect_family(pipe.transformer) == FAMILY[name]


def test_detect_family_unsupported():
    with pytest.raises(UnsupportedModelError) as info:
        detect_family(torch.nn.Linear(2, 2))
    for fam in ("sd3", "flux", "wan", "hunyuan_video", "cogvideox"):
        assert fam in str(info.value)


def test_detect_family_video_classes_on_meta():
    from diffusers import CogVideoXTransformer3DModel, HunyuanVideoTransformer3DModel

    with torch.device("meta"):
        hv = HunyuanVideoTransformer3DModel(num_layers=1, num_single_layers=1, num_attention_heads=2,
                                            attention_head_dim=8, rope_axes_dim=(2, 2, 4))
        cog = CogVideoXTransformer3DModel(num_layers=1, num_attention_heads=2, attention_head_dim=8)
    assert detect_family(hv) == "hunyuan_video" and detect_family(cog) == "cogvideox"


# ---------------------------------------------------------------------------------------------- registry
def test_registry_lists_and_extends():
    names = list_builtin_models()
    assert names[:len(TINY)] == sorted(TINY)
    for arch in ("sd3.5-medium", "flux.1-dev", "wan2.1-1.3b", "wan2.1-14b"):
        assert f"random:{arch}" in names

    def builder(device, dtype, **kwargs):
        pipe = tiny.build_tiny_flux()
        return pipe.to(device, dtype)

    zoo.register_builtin_model("my-test-model", builder)
    try:
        assert "my-test-model" in list_builtin_models()
        assert detect_family(load_pipeline("my-test-model")) == "flux"
        with pytest.raises(ValueError):
            zoo.register_builtin_model("my-test-model", builder)
    finally:
        BUILTIN_MODELS.pop("my-test-model")


# ---------------------------------------------------------------------------------------------- random:*
@pytest.mark.parametrize("arch, low, high", [
    ("sd3.5-medium", 2.2e9, 2.6e9), ("flux.1-dev", 11.5e9, 12.3e9),
    ("wan2.1-1.3b", 1.3e9, 1.5e9), ("wan2.1-14b", 13.5e9, 15e9),
])
def test_random_arch_parameter_counts(arch, low, high):
    assert low < random_models.count_parameters(arch) < high


def test_random_arch_shapes_on_meta():
    sd3 = random_models.random_transformer("random:sd3.5-medium", "meta", torch.bfloat16)
    assert len(sd3.transformer_blocks) == 24 and sd3.config.num_attention_heads == 24
    assert sd3.config.attention_head_dim == 64 and sd3.config.pos_embed_max_size == 384
    assert [b.attn2 is not None for b in sd3.transformer_blocks] == [i <= 12 for i in range(24)]
    assert sd3.config.qk_norm == "rms_norm" and sd3.config.caption_projection_dim == 1536

    flux = random_models.random_transformer("flux.1-dev", "meta")
    assert len(flux.transformer_blocks) == 19 and len(flux.single_transformer_blocks) == 38
    assert flux.config.guidance_embeds and tuple(flux.config.axes_dims_rope) == (16, 56, 56)
    assert flux.config.pooled_projection_dim == 768 and flux.config.joint_attention_dim == 4096

    wan = random_models.random_transformer("wan2.1-1.3b", "meta", torch.bfloat16)
    assert len(wan.blocks) == 30 and wan.config.num_attention_heads == 12 and wan.config.ffn_dim == 8960
    assert wan.config.qk_norm == "rms_norm_across_heads" and wan.config.cross_attn_norm
    assert all(p.device.type == "meta" for p in wan.parameters())
    # like from_pretrained(torch_dtype=bf16): _keep_in_fp32_modules stay float32
    dtypes = {n: p.dtype for n, p in wan.named_parameters()}
    assert dtypes["scale_shift_table"] == torch.float32 and dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16

    assert sd3.pos_embed.pos_embed.dtype == torch.bfloat16  # persistent buffer: cast like from_pretrained
    assert wan.rope.freqs_cos.dtype == torch.float32  # computed buffer: kept

    wan14 = random_models.transformer_config("random:wan2.1-14b")
    assert (wan14["num_layers"], wan14["num_attention_heads"], wan14["ffn_dim"]) == (40, 40, 13824)


def test_random_materialize_init_rules():
    """Init rules on a small real module on the CPU: N(0, 0.02) weights, zero bias, unit norm weights."""
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.LayerNorm(256))
    random_models.materialize_random_(model, "cpu", torch.float32, seed=0)
    w = model[0].weight
    assert abs(w.std().item() - 0.02) < 0.002 and (model[0].bias == 0).all() and (model[1].weight == 1).all()
    with torch.device("meta"):
        again = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.LayerNorm(256))
    random_models.materialize_random_(again, "cpu", torch.float32, seed=0)
    assert torch.equal(again[0].weight, w)


@pytest.mark.parametrize("name, cls", [("random:sd3.5-medium", "StableDiffusion3Pipeline"),
                                       ("random:flux.1-dev", "FluxPipeline"), ("random:wan2.2-t2v-a14b", "WanPipeline")])
def test_random_pipeline_on_meta(name, cls):
    """The whole random pipeline on the meta device: right class, full-size transformer(s), stand-ins
    whose output widths match what the transformer reads."""
    pipe = load_pipeline(name, device="meta", dtype="bf16")
    assert type(pipe).__name__ == cls and pipe.transformer.device.type == "meta"
    tr = pipe.transformer
    if cls == "StableDiffusion3Pipeline":  # CLIP-L 768 + CLIP-G 1280 -> pooled 2048; T5 4096
        assert pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim == 2048
        assert tr.config.pooled_projection_dim == 2048
        assert pipe.text_encoder_3.config.d_model == tr.config.joint_attention_dim == 4096
        assert pipe.vae.config.latent_channels == 16 and pipe.vae_scale_factor == 8
    elif cls == "FluxPipeline":
        assert pipe.text_encoder.config.hidden_size == tr.config.pooled_projection_dim == 768
        assert pipe.text_encoder_2.config.d_model == tr.config.joint_attention_dim == 4096
        assert pipe.tokenizer.model_max_length == 77
    else:
        assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == 0.875
        assert pipe.text_encoder.config.d_model == tr.config.text_dim == 4096
        assert pipe.vae.config.z_dim == tr.config.in_channels == 16
