"""VMoBA installed through mixdit.apply on tiny Wan, HunyuanVideo and CogVideoX denoisers."""

import pytest
import torch

import mixdit
from mixdit.errors import UnsupportedModelError
from mixdit.kernels.reference import visited_index
from mixdit.pipelines.tiny import (TINY_COGVIDEOX_TRANSFORMER, TINY_HUNYUAN_VIDEO_TRANSFORMER, TINY_WAN_TRANSFORMER,
                                   denoiser_inputs)

# tiny grids: every layer type must still cut the grid into several blocks
SMALL = dict(temporal_block=1, spatial_block=(2, 2), spatiotemporal_block=(1, 2, 2), dense_steps=0,
             dense_layers=(), min_tokens=0, kv_tile=16, q_tile=64, max_tile_density=1.0)
ALL_BLOCKS = dict(SMALL, selection="topk", topk_temporal=1000, topk_spatial=1000, topk_spatiotemporal=1000)


def _tiny(cls_name, config, **overrides):
    import diffusers

    torch.manual_seed(0)
    return getattr(diffusers, cls_name)(**dict(config, **overrides)).eval()


def tiny_wan():
    return _tiny("WanTransformer3DModel", TINY_WAN_TRANSFORMER, num_layers=3)


WAN_LATENT = (3, 8, 12)  # 3 x 4 x 6 tokens after the (1, 2, 2) patch


def tiny_hunyuan():
    return _tiny("HunyuanVideoTransformer3DModel", TINY_HUNYUAN_VIDEO_TRANSFORMER)


def tiny_cogvideox():
    return _tiny("CogVideoXTransformer3DModel", TINY_COGVIDEOX_TRANSFORMER)


# (model builder, denoiser_inputs options); HunyuanVideo's inputs pad its last two text tokens (keys masked)
MODELS = [(tiny_wan, dict(latent=WAN_LATENT)), (tiny_hunyuan, {}), (tiny_cogvideox, {})]


@pytest.mark.parametrize("make,inputs", MODELS, ids=["wan", "hunyuan_video", "cogvideox"])
def test_all_blocks_equals_dense_and_remove_is_bitwise(make, inputs):
    from mixdit.attention.vmoba import VMoBAConfig

    model = make()
    x = denoiser_inputs(model, 2, **inputs)
    with torch.no_grad():
        ref = model(**x)[0]
        mixdit.apply(model, vmoba=VMoBAConfig(**ALL_BLOCKS))
        full = model(**x)[0]
        density = mixdit.summary(model)["features"]["vmoba"]["density"]
        mixdit.apply(model, vmoba=VMoBAConfig(**dict(SMALL, threshold=0.25)))
        sparse = model(**x)[0]
        sparse_density = mixdit.summary(model)["features"]["vmoba"]["density"]
        mixdit.remove(model)
        after = model(**x)[0]
    torch.testing.assert_close(full, ref, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(sparse, ref, atol=1e-4), "threshold selection changed nothing"
    assert torch.equal(after, ref)
    assert density and sparse_density, "summary reports no density"


@pytest.mark.parametrize("make,inputs", MODELS, ids=["wan", "hunyuan_video", "cogvideox"])
def test_torch_compile_equals_eager_and_compiles_once(fresh_dynamo, make, inputs):
    """``torch.compile`` (dynamo, eager backend on the CPU) of a denoiser with VMoBA installed: the patched attention
    runs eagerly (joint text tokens included), the output is the eager model's bit for bit, and a second call with
    other latents compiles nothing new."""
    from torch._dynamo.utils import counters

    from mixdit.attention.vmoba import VMoBAConfig

    model = make()
    mixdit.apply(model, vmoba=VMoBAConfig(**dict(SMALL, threshold=0.25)))
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        x = denoiser_inputs(model, 1, **inputs)  # one sample: the kernels run in the CPU interpreter
        assert torch.equal(compiled(**x)[0], model(**x)[0])
        graphs = counters["stats"]["unique_graphs"]
        compiled(**denoiser_inputs(model, 1, seed=1, **inputs))
    mixdit.remove(model)
    assert counters["stats"]["unique_graphs"] == graphs > 0


def test_cfg_batch_selects_per_sample():
    from mixdit.attention.vmoba import VMoBAConfig

    model = tiny_wan()
    mixdit.apply(model, vmoba=VMoBAConfig(**dict(SMALL, threshold=0.25)))
    x = denoiser_inputs(model, 2, latent=WAN_LATENT)
    with torch.no_grad():
        both = model(**x)[0]
        alone = model(**{k: (v[:1] if torch.is_tensor(v) else v) for k, v in x.items()})[0]
        x2 = dict(x, hidden_states=torch.cat([x["hidden_states"][:1], 5 * torch.randn_like(x["hidden_states"][1:])]))
        changed_other = model(**x2)[0]
    torch.testing.assert_close(both[:1], alone, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(changed_other[:1], both[:1], atol=2e-5, rtol=1e-4)
    mixdit.remove(model)


def test_cross_attention_untouched_and_unsupported_family():
    from diffusers import SD3Transformer2DModel

    model = tiny_wan()
    session = mixdit.apply(model, vmoba=True)
    patched = {name for name, m in model.named_modules() if type(getattr(m, "processor", None)).__name__ == "MixditAttnProcessor"}
    assert patched and all(n.endswith("attn1") for n in patched)
    assert session.summary()["patched_attention_modules"] == 3
    mixdit.remove(model)
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
                                pooled_projection_dim=16, out_channels=4)
    with pytest.raises(UnsupportedModelError, match="wan, hunyuan_video, cogvideox"):
        mixdit.apply(sd3, vmoba=True)


def test_query_tile_granularity():
    """The named approximation: one selection per query tile. tau=1 is dense; it stays per sample."""
    from mixdit.attention.vmoba import VMoBAConfig, route_query_tiles, partition_for_layer, vmoba_attention

    B, grid, H, D = 2, (4, 6, 8), 2, 16
    S = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(B, S, H, D) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    base = dict(SMALL, granularity="query_tile")
    for layer in (1, 2, 3):
        full = vmoba_attention(q, k, v, grid=grid, layer_index=layer, config=VMoBAConfig(**dict(base, threshold=1.0)))
        torch.testing.assert_close(full, ref, atol=2e-5, rtol=1e-4)
        cfg = VMoBAConfig(**dict(base, threshold=0.25))
        part = partition_for_layer(grid, layer, cfg)
        qb, kb = q[:, part.q_perm], k[:, part.kv_perm]
        r = route_query_tiles(qb, kb, part, cfg)
        assert r.row_select is None and float(r.tile_density) < 1.0
        # every key tile of a block the query tile overlaps is visited
        n_qt = r.kv_count.shape[-1]
        for t in range(n_qt):
            own_blocks = set(part.q_block[t * cfg.q_tile:(t + 1) * cfg.q_tile].tolist())
            visited = set(r.kv_index[0, 0, t, : r.kv_count[0, 0, t]].tolist())
            own_tiles = {i for i, g in enumerate(part.kv_tile_group.tolist()) if g in own_blocks}
            assert own_tiles <= visited
        # per sample: changing sample 1 leaves sample 0's selection alone
        kb2 = kb.clone()
        kb2[1] = torch.randn_like(kb2[1])
        r2 = route_query_tiles(qb, kb2, part, cfg)
        assert torch.equal(r2.kv_count[0], r.kv_count[0]) and torch.equal(visited_index(r2.kv_count, r2.kv_index)[0],
                                                                      visited_index(r.kv_count, r.kv_index)[0])


def test_dense_fallback_rule_when_sparsity_cannot_pay():
    """max_tile_density: a layer whose selection makes the kernel visit more than that share of the
    key tiles runs dense (the original processor) until the next measurement."""
    from mixdit.attention.vmoba import VMoBAConfig

    model = tiny_wan()
    x = denoiser_inputs(model, 2, latent=WAN_LATENT)
    with torch.no_grad():
        ref = model(**x)[0]
        mixdit.apply(model, vmoba=VMoBAConfig(**dict(SMALL, threshold=0.25, max_tile_density=0.0)))
        first = model(**x)[0]  # measured: sparse
        second = model(**x)[0]  # every layer now over the limit: dense
        fallback = mixdit.summary(model)["features"]["vmoba"]["dense_calls"]
        mixdit.apply(model, vmoba=VMoBAConfig(**dict(SMALL, threshold=0.25)))  # max_tile_density=1.0: rule off
        model(**x)
        model(**x)
        never = mixdit.summary(model)["features"]["vmoba"]["dense_calls"]
    mixdit.remove(model)
    assert not torch.allclose(first, ref, atol=1e-4)
    assert torch.equal(second, ref)
    assert sum(fallback.values()) == 3 and never == {}


def test_dense_fallback_rule_keeps_layers_that_measured_slower_than_dense():
    """The timed half of the rule (GPU measuring calls time sparse and dense attention): a layer whose
    sparse path took longer than dense runs dense until its next measurement, then is measured again."""
    from mixdit.attention.vmoba import VMoBAConfig, VMoBAStats
    from mixdit.attention.vmoba_feature import RECHECK_EVERY, VMoBAFeature

    feature = VMoBAFeature.__new__(VMoBAFeature)  # the rule's state only, no model
    feature.config = VMoBAConfig(max_tile_density=0.9)
    feature._fallback, feature.last_timing = {}, {}
    probe = VMoBAStats()
    probe.record("spatial", torch.tensor(0.2), torch.tensor(0.3))  # tile share under the limit
    slow, fast = ("blocks.1.attn1", (30, 52)), ("blocks.2.attn1", (30, 52))
    assert feature._due(slow) and feature._due(fast)
    feature._update_fallback(slow, probe, (15.0, 11.0))  # sparse 15 ms vs dense 11 ms
    feature._update_fallback(fast, probe, (4.0, 11.0))
    assert feature._fallback[slow][0] == "slower_than_dense" and feature._fallback[fast][0] is None
    assert feature.last_timing["blocks.1.attn1"] == {"sparse_ms": 15.0, "dense_ms": 11.0}
    assert not feature._due(slow) and feature._fallback[slow][1] == RECHECK_EVERY - 1
    feature._update_fallback(fast, probe, None)  # CPU (no timing) between measurements: only counts down
    assert feature._fallback[fast] == [None, RECHECK_EVERY - 2]
    # a layer's first (warm-up, compiling) call on a GPU is not timed: the next call is the timed one
    first = ("blocks.3.attn1", (30, 52))
    feature._update_fallback(first, probe, None, time_next_call=True)
    assert feature._fallback[first] == [None, 0] and feature._due(first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_measuring_call_times_sparse_and_dense():
    from mixdit.attention.vmoba import VMoBAConfig

    model = tiny_wan()
    x = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in denoiser_inputs(model, 2, latent=WAN_LATENT).items()}
    model = model.cuda()
    with torch.no_grad():
        mixdit.apply(model, vmoba=VMoBAConfig(**dict(SMALL, threshold=0.25, max_tile_density=0.99)))
        model(**x)  # warm-up call: tile share only
        assert mixdit.summary(model)["features"]["vmoba"]["last_timing"] == {}
        model(**x)  # the timed measurement
        timing = mixdit.summary(model)["features"]["vmoba"]["last_timing"]
    mixdit.remove(model)
    assert timing and all(t["sparse_ms"] > 0 and t["dense_ms"] > 0 for t in timing.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_inductor_compiled_model_runs_vmoba_eagerly(fresh_dynamo):
    """``torch.compile`` (inductor) of a model with VMoBA installed: the patched attention stays eager (mixdit's
    Triton kernels, measured per-call state), the rest compiles, the feature sees every call, and the output is the
    eager model's up to precision. Every block is selected so no threshold cut can move; the tolerance is the
    kernels' TF32 dot on this fp32 model (measured on an H200: inductor's last-bit differences, 5e-7 at layer 0's
    q/k/v, become 3e-4 at layer 1's and 4.5e-4 at the output; the same model compiled without mixdit: 4e-7)."""
    from mixdit.attention.vmoba import VMoBAConfig

    model = tiny_wan().cuda()
    x = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in denoiser_inputs(model, 2, latent=WAN_LATENT).items()}
    with torch.no_grad():
        mixdit.apply(model, vmoba=VMoBAConfig(**ALL_BLOCKS))
        eager = model(**x)[0]
        calls = mixdit.summary(model)["features"]["vmoba"]["density"]["spatial"]["calls"]
        for mode in ("default", "reduce-overhead"):  # the latter: CUDA graphs around the compiled parts
            torch._dynamo.reset()
            compiled = torch.compile(model, mode=mode)(**x)[0].clone()
            torch.testing.assert_close(compiled, eager, atol=2e-3, rtol=0)
        after = mixdit.summary(model)["features"]["vmoba"]["density"]["spatial"]["calls"]
    mixdit.remove(model)
    assert after == 3 * calls


@pytest.mark.parametrize("name", ["tiny-hunyuan-video", "tiny-cogvideox"])
def test_video_pipeline_dense_steps_then_sparse(name):
    """In real HunyuanVideo (text after the video, padded text masked) and CogVideoX (text before, CFG batch
    [uncond, cond]) pipelines: the first dense_steps run dense, the rest sparse with the text tokens kept dense;
    every block selected gives the dense output; remove() restores it bitwise."""
    from mixdit.attention.vmoba import VMoBAConfig

    pipe = mixdit.load_pipeline(name)
    layers = mixdit.api.adapter_for(pipe).num_layers(pipe.transformer)
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe("a red cat", num_inference_steps=4, height=64, width=64, num_frames=9, guidance_scale=6.0,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).frames

    ref = run()
    mixdit.apply(pipe, vmoba=VMoBAConfig(**dict(ALL_BLOCKS, dense_steps=2)))
    full = run()
    dense_calls = mixdit.summary(pipe)["features"]["vmoba"]["dense_calls"]
    mixdit.apply(pipe, vmoba=VMoBAConfig(**dict(SMALL, threshold=0.25, dense_steps=2)))
    sparse = run()
    mixdit.remove(pipe)
    torch.testing.assert_close(full, ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(sparse, ref, atol=1e-4), "the sparse steps changed nothing"
    assert dense_calls.get("dense_steps") == 2 * layers, dense_calls  # 2 of 4 steps, one call per step
    assert torch.equal(run(), ref)
