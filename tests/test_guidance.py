"""Head perturbation guidance on tiny SD3 / FLUX / Wan / HunyuanVideo / CogVideoX pipelines (CPU, float32)."""

import copy

import pytest
import torch

import mixdit
from mixdit.errors import ConfigError
from mixdit.guidance.perturbation import (GuidanceConfig, blend_perturbation, explicit_perturbed_attention,
                                          guidance_feature, row_layout)
from mixdit.pipelines.tiny import denoiser_inputs

STEPS = 2
CALL_KW = {
    "tiny-sd3": dict(guidance_scale=4.0),
    "tiny-flux": dict(height=64, width=64, guidance_scale=3.5),
    "tiny-wan": dict(height=64, width=64, num_frames=9, guidance_scale=4.0),
    "tiny-hunyuan-video": dict(height=64, width=64, num_frames=9, guidance_scale=6.0),  # embedded guidance
    "tiny-cogvideox": dict(height=64, width=64, num_frames=9, guidance_scale=6.0),  # CFG rows batched [uncond, cond]
}


def _pipe(name):
    pipe = mixdit.load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, name, **extra):
    kw = dict(CALL_KW[name])
    kw.update(extra)
    out = pipe("a red cat", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
               output_type="latent", **kw)
    return out.images if hasattr(out, "images") else out.frames


def _last_layer(pipe):
    return mixdit.api.adapter_for(pipe).num_layers(pipe.transformer) - 1


@pytest.fixture(scope="module")
def pipes():
    return {name: _pipe(name) for name in CALL_KW}


@pytest.mark.parametrize("name", list(CALL_KW))
def test_scale_zero_and_softpag_zero_are_bitwise(pipes, name):
    pipe = pipes[name]
    ref = _run(pipe, name)
    last = _last_layer(pipe)
    mixdit.apply(pipe, guidance=GuidanceConfig(heads=f"L{last}", scale=0.0))
    assert torch.equal(_run(pipe, name), ref)
    mixdit.apply(pipe, guidance=GuidanceConfig(heads=f"L{last}", scale=3.0, softpag=0.0))
    assert torch.equal(_run(pipe, name), ref)
    mixdit.apply(pipe, guidance=GuidanceConfig(heads=f"L{last}H0", scale=3.0, softpag=0.5))
    changed = _run(pipe, name)
    assert not torch.allclose(changed, ref)
    s = mixdit.summary(pipe)["features"]["guidance"]
    assert s["perturbed_calls"] == STEPS  # one perturbed pass per step: cond calls only (Wan/FLUX call names)
    mixdit.remove(pipe)
    assert torch.equal(_run(pipe, name), ref)


@pytest.mark.parametrize("name", list(CALL_KW))
def test_shared_prefix_equals_naive_in_pipeline(pipes, name):
    pipe = pipes[name]
    last = _last_layer(pipe)
    outs = []
    for shared in (True, False):
        mixdit.apply(pipe, guidance=GuidanceConfig(heads=f"L{last}H1,L{last - 1}H0", scale=2.0, softpag=0.6,
                                                   shared_prefix=shared))
        outs.append(_run(pipe, name))
        assert mixdit.summary(pipe)["features"]["guidance"]["last_fork_layer"] == last - 1
    mixdit.remove(pipe)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_torch_compiled_denoiser_equals_eager(fresh_dynamo, pipes):
    """The shared-prefix fork (rows added at a block, a plan per call) under ``torch.compile``: same output as eager
    on every call, nothing recompiled after the first."""
    from torch._dynamo.utils import counters

    model = copy.deepcopy(pipes["tiny-wan"].transformer)
    last = mixdit.api.adapter_for(model).num_layers(model) - 1
    mixdit.apply(model, guidance=GuidanceConfig(heads=f"L{last}H1,L{last - 1}H0", scale=2.5, softpag=0.7))
    compiled = torch.compile(model, backend="eager")
    graphs = []
    with torch.no_grad():
        for seed in (1, 2):
            x = denoiser_inputs(model, 2, seed=seed)
            with row_layout(model, ("uncond", "cond"), cfg_scale=4.0):
                torch.testing.assert_close(compiled(**x)[0], model(**x)[0], rtol=0, atol=0)
            graphs.append(counters["stats"]["unique_graphs"])
    assert guidance_feature(model).stats["perturbed_calls"] == 4
    mixdit.remove(model)
    assert graphs[0] == graphs[1] > 0


@pytest.mark.parametrize("name", list(CALL_KW))
@pytest.mark.parametrize("mode", ["identity", "identity_image", "uniform", "mean_query"])
def test_shared_prefix_equals_three_pass(pipes, name, mode):
    """[uncond, cond] + perturbed rows, forked at the first perturbed layer == three separate passes."""
    model = copy.deepcopy(pipes[name].transformer)
    last = mixdit.api.adapter_for(model).num_layers(model) - 1
    x = denoiser_inputs(model, 2, seed=1)
    s, w, u = 2.5, 4.0, 0.7
    cfg = GuidanceConfig(heads=f"L{last}H1,L{last - 1}H0", scale=s, softpag=u, mode=mode)
    with torch.no_grad():
        eps_u, eps_c = model(**x)[0].chunk(2)
        # the perturbed pass alone: every row perturbed in place, no extra rows, no folding
        mixdit.apply(model, guidance=cfg)
        feature = guidance_feature(model)
        feature._perturb_in_place = True
        cond_only = {k: (v[1:] if torch.is_tensor(v) and v.shape[0] == 2 else v) for k, v in x.items()}
        eps_p = model(**cond_only)[0]
        feature._perturb_in_place = False
        assert not torch.allclose(eps_p, eps_c)
        with row_layout(model, ("uncond", "cond"), cfg_scale=w):
            fused = model(**x)[0]
        assert feature.stats["last_fork_layer"] == last - 1
        mixdit.remove(model)
    guided = eps_u + w * (fused[1:] - eps_u)
    expected = eps_u + w * (eps_c - eps_u) + s * (eps_c - eps_p)
    torch.testing.assert_close(fused[:1], eps_u, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mode,text_len,pos", [("identity", 5, "after"), ("identity_image", 5, "after"),
                                               ("identity_image", 4, "before"), ("uniform", 0, "cross"),
                                               ("mean_query", 5, "before")])
@pytest.mark.parametrize("u", [0.0, 0.35, 1.0])
def test_blend_matches_explicit_map(mode, text_len, pos, u):
    torch.manual_seed(0)
    R, H, S, D = 2, 3, 21, 8
    q, k, v = (torch.randn(R, H, S, D) for _ in range(3))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    weight = torch.tensor([[u, 0.0, u], [0.0, u, u]])
    got = blend_perturbation(out, q, k, v, weight, mode, text_len=text_len, text_position=pos)
    ref = explicit_perturbed_attention(q, k, v, weight, mode, text_len=text_len, text_position=pos)
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5)
    if u == 0.0:
        assert torch.equal(got, out)
    if mode == "identity" and u == 1.0:
        assert torch.allclose(got[0, 0], v[0, 0], atol=1e-6)  # A -> I: the head outputs its values


def _pag_components(num_layers=3):
    from diffusers import SD3Transformer2DModel

    base = _pipe("tiny-sd3")
    comps = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    torch.manual_seed(0)
    cfg = dict(base.transformer.config)
    # diffusers' PAG processor does not apply qk-norm and has no dual attention: use a plain SD3 transformer
    comps["transformer"] = SD3Transformer2DModel(
        sample_size=cfg["sample_size"], patch_size=cfg["patch_size"], in_channels=cfg["in_channels"],
        num_layers=num_layers, attention_head_dim=cfg["attention_head_dim"],
        num_attention_heads=cfg["num_attention_heads"], joint_attention_dim=cfg["joint_attention_dim"],
        caption_projection_dim=cfg["caption_projection_dim"], pooled_projection_dim=cfg["pooled_projection_dim"],
        out_channels=cfg["out_channels"], pos_embed_max_size=cfg["pos_embed_max_size"]).eval()
    return comps


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0])
def test_identity_image_matches_diffusers_sd3_pag(guidance_scale):
    from diffusers import StableDiffusion3PAGPipeline, StableDiffusion3Pipeline

    comps = _pag_components()
    pag = StableDiffusion3PAGPipeline(**{**comps, "transformer": copy.deepcopy(comps["transformer"])},
                                      pag_applied_layers=["blocks.1"])
    ours = StableDiffusion3Pipeline(**comps)
    for p in (pag, ours):
        p.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, guidance_scale=guidance_scale, output_type="latent")
    ref = pag("a red cat", pag_scale=2.0, generator=torch.Generator().manual_seed(0), **kw).images
    plain = ours("a red cat", generator=torch.Generator().manual_seed(0), **kw).images
    mixdit.apply(ours, guidance=GuidanceConfig(heads="L1", scale=2.0, softpag=1.0, mode="identity_image"))
    got = ours("a red cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert not torch.allclose(ref, plain, atol=1e-3)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # whole-sequence identity (the paper's PAG) is a different perturbation
    mixdit.apply(ours, guidance=GuidanceConfig(heads="L1", scale=2.0, mode="identity"))
    other = ours("a red cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert not torch.allclose(other, ref, atol=1e-4)
    mixdit.remove(ours)


def test_window_limits_steps(pipes):
    pipe = pipes["tiny-sd3"]
    mixdit.apply(pipe, guidance=GuidanceConfig(heads="L1", scale=2.0, window=(0.5, 1.0)))
    out = pipe("a red cat", num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent",
               guidance_scale=4.0)
    assert out.images is not None
    assert mixdit.summary(pipe)["features"]["guidance"]["perturbed_calls"] == 2
    mixdit.remove(pipe)


def test_flux_true_cfg_scale_is_read(pipes):
    """FLUX keeps true_cfg_scale as a local of __call__: the fold must use it (s / w)."""
    pipe = pipes["tiny-flux"]
    kw = dict(height=64, width=64, num_inference_steps=STEPS, output_type="latent", negative_prompt="blurry")
    mixdit.apply(pipe, guidance=GuidanceConfig(heads="L3", scale=2.0))
    seen = []
    feature = guidance_feature(pipe)
    orig = feature.post_forward

    def spy(ctx, model, output):
        plan = ctx.extras.get("guidance")
        seen.append(None if plan is None else plan.cfg_scale)
        return orig(ctx, model, output)

    feature.post_forward = spy
    pipe("a red cat", true_cfg_scale=3.0, generator=torch.Generator().manual_seed(0), **kw)
    mixdit.remove(pipe)
    assert seen == [3.0, None] * STEPS  # cond call folded with w = 3, uncond call untouched


@pytest.mark.parametrize("spec,match", [
    ("L9", r"guidance\.heads = 'L9' .*layers 0\.\.1 for sd3; layer 9 is out of range"),
    ("L1H7", r"heads 0\.\.3 in layer 1 for sd3; head 7 is out of range"),
    ("L1X", r"'L1X' does not parse"),
    ("", r"empty spec"),
])
def test_head_spec_errors(pipes, spec, match):
    with pytest.raises(ConfigError, match=match):
        mixdit.apply(pipes["tiny-sd3"], guidance=GuidanceConfig(heads=spec))
    assert mixdit.summary(pipes["tiny-sd3"]) == {"features": {}}


@pytest.mark.parametrize("field,value", [("softpag", 1.5), ("mode", "blur"), ("window", (0.6, 0.2)),
                                         ("scale", -1.0)])
def test_config_errors(field, value):
    with pytest.raises(ConfigError, match=f"guidance.{field}"):
        GuidanceConfig(**{field: value}).validate()


def test_guider_matches_formula(pipes):
    """The diffusers.guiders subclass: perturbed pass via the same attention transform, same formula."""
    from mixdit.guidance.guider import HeadPerturbationGuidance

    model = copy.deepcopy(pipes["tiny-sd3"].transformer)
    x = denoiser_inputs(pipes["tiny-sd3"].transformer, 2, seed=1)
    guider = HeadPerturbationGuidance(guidance_scale=4.0, perturbed_guidance_scale=2.0, heads="L1H0", softpag=0.8)
    guider.set_state(step=0, num_inference_steps=2, timestep=torch.tensor(500))
    assert guider.num_conditions == 3
    preds = {}
    cond_only = {k: (v[1:] if torch.is_tensor(v) and v.shape[0] == 2 else v) for k, v in x.items()}
    uncond_only = {k: (v[:1] if torch.is_tensor(v) and v.shape[0] == 2 else v) for k, v in x.items()}
    with torch.no_grad():
        for name, inputs in zip(guider._input_predictions, (cond_only, uncond_only, cond_only)):
            guider.prepare_models(model)
            preds[name] = model(**inputs)[0]
            guider.cleanup_models(model)
        out = guider.forward(**preds).pred
        ref = mixdit.apply(model, guidance=GuidanceConfig(heads="L1H0", scale=2.0, softpag=0.8))
        with row_layout(model, ("uncond", "cond"), cfg_scale=4.0):
            fused = model(**x)[0]
        mixdit.remove(model)
    eps_u = fused[:1]
    torch.testing.assert_close(out, eps_u + 4.0 * (fused[1:] - eps_u), atol=2e-5, rtol=1e-4)
    assert ref is not None


def test_cogvideox_pipeline_perturbs_cond_rows_only(pipes):
    """CogVideoXPipeline batches [uncond, cond] under CFG (a local of its __call__): only the cond row of each
    step gets a perturbed copy; without CFG every row is cond."""
    pipe = pipes["tiny-cogvideox"]
    for w in (6.0, 1.0):
        mixdit.apply(pipe, guidance=GuidanceConfig(heads="L2", scale=3.0))
        _run(pipe, "tiny-cogvideox", guidance_scale=w)
        stats = mixdit.summary(pipe)["features"]["guidance"]
        mixdit.remove(pipe)
        assert stats["perturbed_calls"] == STEPS and stats["perturbed_rows"] == STEPS, (w, stats)


def test_cogvideox_dynamic_cfg_folds_with_this_steps_scale(pipes):
    """With use_dynamic_cfg CogVideoXPipeline sets each step's CFG scale only after its transformer call; the fold
    must use that step's scale (the pipeline's formula at this t), not the previous step's."""
    import math

    from mixdit.guidance.perturbation import PLAN_KEY
    from mixdit.pipelines.context import current_context

    pipe = pipes["tiny-cogvideox"]
    mixdit.apply(pipe, guidance=GuidanceConfig(heads="L2", scale=3.0))
    times, scales = [], []  # each call's timestep (transformer input) and fold scale (read inside the first block)
    hooks = [pipe.transformer.register_forward_pre_hook(
                 lambda module, args, kwargs: times.append(float(kwargs["timestep"][0])), with_kwargs=True),
             pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
                 lambda module, args: scales.append(current_context().extras[PLAN_KEY].cfg_scale))]
    try:
        _run(pipe, "tiny-cogvideox", guidance_scale=6.0, use_dynamic_cfg=True)
    finally:
        for h in hooks:
            h.remove()
        mixdit.remove(pipe)
    seen = list(zip(times, scales))
    assert len(seen) == STEPS
    for t, scale in seen:
        want = 1 + 6.0 * (1 - math.cos(math.pi * ((STEPS - t) / STEPS) ** 5.0)) / 2
        assert scale == pytest.approx(want, rel=1e-6), (t, scale, want)
    # the lagging fold took the scale the pipeline had set before this call: at the first step guidance_scale
    assert seen[0][1] != 6.0


def test_hunyuan_video_true_cfg_perturbs_the_cond_call_only(pipes):
    """HunyuanVideoPipeline with true CFG (a negative prompt and true_cfg_scale > 1) calls the transformer for
    "cond", then for "uncond": only the first gets perturbed rows, folded with w = true_cfg_scale."""
    from mixdit.guidance.perturbation import PLAN_KEY
    from mixdit.pipelines.context import current_context

    pipe = pipes["tiny-hunyuan-video"]
    mixdit.apply(pipe, guidance=GuidanceConfig(heads="L3", scale=3.0))
    seen = []  # (row roles, the fold's CFG scale) of each call, read inside the first block

    def record(module, args):
        ctx = current_context()
        plan = ctx.extras.get(PLAN_KEY)
        seen.append((ctx.row_roles, None if plan is None else plan.cfg_scale))

    handle = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(record)
    try:
        _run(pipe, "tiny-hunyuan-video", negative_prompt="blurry", true_cfg_scale=4.0)
    finally:
        handle.remove()
    stats = mixdit.summary(pipe)["features"]["guidance"]
    mixdit.remove(pipe)
    assert stats["perturbed_calls"] == STEPS and stats["perturbed_rows"] == STEPS, stats
    assert seen == [(("cond", "perturbed"), 4.0), (("uncond",), None)] * STEPS, seen
