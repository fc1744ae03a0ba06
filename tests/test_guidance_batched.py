"""The HeadHunter search's batched call (K candidate rows, one head set per row) on bare tiny SD3 / FLUX / Wan /
HunyuanVideo / CogVideoX transformers (CPU, float32): each row equals that candidate's own single call, and the call
computes exactly the rows of the fork rule (K rows before the first perturbed layer, 2K from it on)."""

import pytest
import torch
from diffusers import (CogVideoXTransformer3DModel, FluxTransformer2DModel, HunyuanVideoTransformer3DModel,
                       SD3Transformer2DModel, WanTransformer3DModel)

import mixdit
import mixdit.guidance.perturbation as perturbation
from mixdit.guidance.perturbation import GuidanceConfig, guidance_feature
from mixdit.pipelines.context import current_context
from mixdit.pipelines.tiny import (TINY_COGVIDEOX_TRANSFORMER, TINY_FLUX_TRANSFORMER, TINY_HUNYUAN_VIDEO_TRANSFORMER,
                                   TINY_SD3_TRANSFORMER, TINY_WAN_TRANSFORMER, denoiser_inputs)

FAMILIES = ("sd3", "flux", "wan", "hunyuan_video", "cogvideox")
# K = 5 candidates, 4-layer models: late, late, middle, a two-layer set (fork at 0), middle
HEAD_SETS = [{(3, 0)}, {(3, 1)}, {(1, 0)}, {(0, 1), (3, 0)}, {(2, 1)}]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {  # four attention layers each (FLUX and HunyuanVideo: 2 double-stream + 2 single-stream blocks)
        "sd3": SD3Transformer2DModel(**dict(TINY_SD3_TRANSFORMER, num_layers=4)).eval(),
        "flux": FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER).eval(),
        "wan": WanTransformer3DModel(**dict(TINY_WAN_TRANSFORMER, num_layers=4)).eval(),
        "hunyuan_video": HunyuanVideoTransformer3DModel(**dict(TINY_HUNYUAN_VIDEO_TRANSFORMER, num_single_layers=2)).eval(),
        "cogvideox": CogVideoXTransformer3DModel(**dict(TINY_COGVIDEOX_TRANSFORMER, num_layers=4)).eval(),
    }


def _inputs(family, model, batch, seed):
    """Fresh random rows: every candidate on its own trajectory (own latent, own text, own timestep)."""
    return denoiser_inputs(model, batch, seed=seed, random_timesteps=True)


def _rows(x, i):
    B = x["hidden_states"].shape[0]
    return {k: (v[i:i + 1] if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == B else v) for k, v in x.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("mode", ["identity", "mean_query"])
def test_k_row_batch_equals_single_candidate_calls(models, family, shared, mode):
    model = models[family]
    K = len(HEAD_SETS)
    x = _inputs(family, model, K, seed=100 + FAMILIES.index(family))
    with torch.no_grad():
        plain = model(**x)[0]
        mixdit.apply(model, guidance=GuidanceConfig(heads="L0-3", scale=3.0, softpag=0.8, mode=mode,
                                                    shared_prefix=shared))
        feature = guidance_feature(model)
        try:
            feature.row_head_sets = [frozenset(hs) for hs in HEAD_SETS]
            batched = model(**x)[0]
            singles = []
            feature.config.shared_prefix = False  # the reference: each candidate alone, every row full depth
            for i, hs in enumerate(HEAD_SETS):
                feature.row_head_sets = [frozenset(hs)]
                singles.append(model(**_rows(x, i))[0])
        finally:
            mixdit.remove(model)
    assert batched.shape == plain.shape
    for i in range(K):
        assert not torch.allclose(batched[i], plain[i], atol=1e-4), f"row {i} not perturbed"
        torch.testing.assert_close(batched[i:i + 1], singles[i], atol=2e-5, rtol=1e-4, msg=f"row {i} ({family})")


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_call_computes_fork_rule_rows_only(models, family, monkeypatch):
    """Blocks before the first perturbed layer see the K cond rows, blocks from it on 2K rows; the
    perturbation math runs once per perturbed layer, on the K perturbed rows only."""
    model = models[family]
    adapter = mixdit.api.adapter_for(model)
    K = 4
    sets = [{(2, 0)}, {(2, 1)}, {(3, 1)}, {(3, 0)}]
    blends = []
    real_blend = perturbation.blend_perturbation

    def counting_blend(out, q, *args, **kwargs):
        blends.append((current_context().layer_index, out.shape[0]))
        return real_blend(out, q, *args, **kwargs)

    monkeypatch.setattr(perturbation, "blend_perturbation", counting_blend)
    x = _inputs(family, model, K, seed=7)
    for shared in (True, False):
        mixdit.apply(model, guidance=GuidanceConfig(heads="L0-3", scale=3.0, shared_prefix=shared))
        guidance_feature(model).row_head_sets = sets
        seen, handles = {}, []
        for layer, block in adapter.blocks(model):  # registered after mixdit's own pre-hooks: sees their result
            def hook(mod, args, kwargs, layer=layer):
                h = kwargs.get("hidden_states", args[0] if args else None)
                seen[layer] = int(h.shape[0])
            handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
        blends.clear()
        try:
            with torch.no_grad():
                out = model(**x)[0]
        finally:
            for h in handles:
                h.remove()
            mixdit.remove(model)
        assert out.shape[0] == K
        expected = {layer: (K if shared and layer < 2 else 2 * K) for layer in range(4)}
        assert seen == expected, (shared, seen)
        assert sorted(blends) == [(2, K), (3, K)]
