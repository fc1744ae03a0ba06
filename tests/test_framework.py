"""apply / remove / summary, the forward context and the processor wrapper, on tiny denoisers."""

from dataclasses import dataclass

import pytest
import torch

import mixdit
from mixdit.api import FEATURES, Feature, register_feature
from mixdit.errors import ConfigError, UnsupportedModelError
from mixdit.pipelines.adapters import adapter_for


def tiny_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                 out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=3,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                 pooled_projection_dim=64, out_channels=4).eval()


def wan_inputs(batch=2):
    return dict(hidden_states=torch.randn(batch, 16, 3, 8, 10), timestep=torch.tensor([500.0] * batch),
                encoder_hidden_states=torch.randn(batch, 7, 32), return_dict=False)


def sd3_inputs(batch=2):
    return dict(hidden_states=torch.randn(batch, 4, 8, 8), encoder_hidden_states=torch.randn(batch, 5, 32),
                pooled_projections=torch.randn(batch, 64), timestep=torch.tensor([10.0] * batch), return_dict=False)


@dataclass
class RecorderConfig:
    scale: float = 1.0

    def validate(self):
        from mixdit.config import check_number

        check_number("recorder.scale", self.scale, 0.0, 10.0)


class Recorder(Feature):
    """Test feature: records each attention call's context and scales the output."""

    keyword, config_class = "_recorder", RecorderConfig
    seen: list = []

    def sites(self, model, denoiser_name):
        return self.adapter.attention_sites(model)

    def attend(self, call):
        Recorder.seen.append((call.ctx.layer_index, call.ctx.grid, call.ctx.text_len, call.ctx.text_position,
                              tuple(call.query.shape)))
        return None  # defer to dense

    def transform(self, call, out):
        return out * self.config.scale

    def summary(self):
        return {"calls": len(Recorder.seen)}


@pytest.fixture(autouse=True)
def _register():
    register_feature(Recorder)
    Recorder.seen = []
    yield
    FEATURES.pop("_recorder", None)


@pytest.mark.parametrize("make,inputs", [(tiny_wan, wan_inputs), (tiny_sd3, sd3_inputs)])
def test_apply_identity_then_remove_is_bitwise(make, inputs):
    model = make()
    x = inputs()
    with torch.no_grad():
        ref = model(**x)[0]
        mixdit.apply(model, _recorder=RecorderConfig(scale=1.0))
        patched = model(**x)[0]
        assert Recorder.seen, "feature never saw an attention call"
        assert torch.equal(patched, ref)
        mixdit.apply(model, _recorder={"scale": 0.5})  # applying twice replaces
        changed = model(**x)[0]
        assert not torch.allclose(changed, ref)
        procs = [s.module.processor for s in adapter_for(model).attention_sites(model)]
        assert all(type(p).__name__ == "MixditAttnProcessor" for p in procs)
        assert all(type(p.original).__name__ != "MixditAttnProcessor" for p in procs)  # never double-wrapped
        mixdit.remove(model)
        after = model(**x)[0]
    assert torch.equal(after, ref)
    assert mixdit.summary(model) == {"features": {}}


def test_forward_context_wan():
    model = tiny_wan()
    mixdit.apply(model, _recorder=True)
    with torch.no_grad():
        model(**wan_inputs(batch=1))
    layers = [s[0] for s in Recorder.seen]
    assert layers == [0, 1, 2]
    assert all(s[1] == (3, 4, 5) and s[2] == 0 and s[3] == "cross" for s in Recorder.seen)
    s = mixdit.summary(model)
    assert s["family"] == "wan" and s["patched_attention_modules"] == 3 and s["denoiser_calls"] == 1
    assert mixdit.current_context() is None  # reset after the call
    mixdit.remove(model)


def test_forward_context_sd3_text_after():
    model = tiny_sd3()
    mixdit.apply(model, _recorder=True)
    with torch.no_grad():
        model(**sd3_inputs(batch=1))
    assert [s[0] for s in Recorder.seen] == [0, 1]
    assert all(s[1] == (1, 8, 8) and s[2] == 5 and s[3] == "after" and s[4][2] == 64 + 5 for s in Recorder.seen)
    mixdit.remove(model)


def test_bad_config_names_field():
    model = tiny_wan()
    with pytest.raises(ConfigError, match=r"recorder\.scale = 99 .*\[0\.0, 10\.0\]"):
        mixdit.apply(model, _recorder=RecorderConfig(scale=99))
    with pytest.raises(ConfigError, match="feature keyword"):
        mixdit.apply(model, not_a_feature=True)
    assert mixdit.summary(model) == {"features": {}}


def test_unsupported_model_lists_families():
    with pytest.raises(UnsupportedModelError, match="sd3.*flux.*wan.*hunyuan_video.*cogvideox"):
        mixdit.apply(torch.nn.Linear(2, 2), _recorder=True)


def test_parallel_model_is_refused_and_the_installed_session_kept():
    """A denoiser sharded by diffusers' context parallelism would attend within each rank's slice once mixdit's
    processor (native backend) replaced the exchanging one: refused by apply (tensor parallelism too: untested), and
    what was installed stays; sharded after apply (diffusers then configures the wrappers), the calls refuse it, and
    remove gives the processors back with diffusers' setting."""
    from types import SimpleNamespace

    from mixdit.api import session_of

    model = tiny_wan()
    session = mixdit.apply(model, _recorder=RecorderConfig(scale=0.5))
    model._parallel_config = SimpleNamespace(context_parallel_config=SimpleNamespace(ulysses_degree=2))
    with pytest.raises(UnsupportedModelError, match="enable_parallelism"):
        mixdit.apply(model, _recorder=RecorderConfig(scale=1.0))
    assert session_of(model) is session and session.features[0].config.scale == 0.5  # the earlier session is untouched
    # what enable_parallelism does to each attention processor it finds (here: mixdit's wrappers)
    cp = SimpleNamespace(context_parallel_config=SimpleNamespace(ulysses_degree=2))
    for site in adapter_for(model).attention_sites(model):
        if hasattr(site.module.processor, "_parallel_config"):
            site.module.processor._parallel_config = cp
    with torch.no_grad(), pytest.raises(UnsupportedModelError, match="enable_parallelism"):
        model(**wan_inputs())
    model._parallel_config = None
    mixdit.remove(model)
    assert all(s.module.processor._parallel_config is cp for s in adapter_for(model).attention_sites(model))


def test_pipeline_with_cpu_offload_apply_then_remove_is_bitwise():
    """A whole tiny pipeline under accelerate's model offload hooks: patched output differs,
    removed output is bitwise the untouched one."""
    import numpy as np

    pipe = mixdit.load_pipeline("tiny-sd3")
    pipe.enable_model_cpu_offload(device="cpu")  # the accelerate hooks are what matters here
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe("a red square", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(3)).images

    ref = run()
    mixdit.apply(pipe, guidance=mixdit.GuidanceConfig(heads="L1", scale=2.0))
    patched = run()
    mixdit.remove(pipe)
    after = run()
    assert np.abs(patched - ref).max() > 1e-4
    assert np.array_equal(after, ref)


@pytest.mark.parametrize("name,expected", [
    ("tiny-sd3", [("uncond", "cond")]),  # one batched CFG call per step
    ("tiny-wan", [("cond",), ("uncond",)]),  # separate cond / uncond calls per step
])
def test_forward_context_row_roles_and_steps(name, expected):
    pipe = mixdit.load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    seen = []

    class Roles(Recorder):
        def attend(self, call):
            if call.site.layer_index == 0:
                seen.append((call.ctx.row_roles, call.ctx.step_index, call.ctx.num_steps))
            return None

    register_feature(Roles)
    kw = dict(num_frames=9) if name == "tiny-wan" else {}
    mixdit.apply(pipe, _recorder=True)
    pipe("a red square", num_inference_steps=2, height=64, width=64, guidance_scale=4.0, output_type="np",
         generator=torch.Generator().manual_seed(0), **kw)
    mixdit.remove(pipe)
    per_step = len(expected)
    assert [s[0] for s in seen] == expected * 2
    assert [s[1] for s in seen] == [0] * per_step + [1] * per_step and all(s[2] == 2 for s in seen)


@pytest.mark.parametrize("make,inputs,layers", [(tiny_wan, wan_inputs, 3), (tiny_sd3, sd3_inputs, 2)])
def test_torch_compile_keeps_features_eager_and_compiles_once(fresh_dynamo, make, inputs, layers):
    """Under ``torch.compile`` mixdit's bookkeeping and patched attention modules run eagerly (graph breaks), so the
    features see every call and a later call with another timestep compiles nothing new (the per-call state
    would otherwise be guarded on and recompiled each call)."""
    from torch._dynamo.utils import counters

    model = make()
    mixdit.apply(model, _recorder=RecorderConfig(scale=0.5))
    compiled = torch.compile(model, backend="eager")
    graphs = []
    with torch.no_grad():
        for t in (900.0, 500.0, 100.0):
            x = inputs()
            x["timestep"] = torch.tensor([t, t])
            seen_before = len(Recorder.seen)
            out = compiled(**x)[0]
            torch.testing.assert_close(out, model(**x)[0], rtol=0, atol=0)
            assert len(Recorder.seen) - seen_before == 2 * layers, "the feature missed attention calls"  # compiled + eager
            graphs.append(counters["stats"]["unique_graphs"])
    mixdit.remove(model)
    assert graphs[0] > 0 and graphs[1] == graphs[2] == graphs[0], f"recompiled on later calls: {graphs}"


def test_apply_to_an_already_compiled_denoiser(fresh_dynamo):
    """``mixdit.apply`` on a ``torch.compile`` wrapper (or a pipeline holding one) patches the model inside it: the
    feature runs in the compiled calls, and ``remove`` gives the untouched output back."""
    model = tiny_wan()
    compiled = torch.compile(model, backend="eager")
    x = wan_inputs()
    with torch.no_grad():
        ref = compiled(**x)[0]
        mixdit.apply(compiled, _recorder=RecorderConfig(scale=0.5))
        seen_before = len(Recorder.seen)
        patched = compiled(**x)[0]
        assert len(Recorder.seen) - seen_before == 3
        assert not torch.allclose(patched, ref, atol=1e-4)
        mixdit.remove(compiled)
        assert torch.equal(compiled(**x)[0], ref)
