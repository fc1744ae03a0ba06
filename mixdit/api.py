"""``apply`` / ``remove`` / ``summary``: the one door through which features enter a pipeline.

A feature is a :class:`Feature` subclass registered under a keyword (``vmoba=``, ``guidance=``, ...)
with a typed config class. ``apply`` validates every config, removes whatever mixdit installed
before (applying twice replaces, never double-wraps), then installs:

* one ``diffusers.hooks`` hook per denoiser (:class:`_ForwardContextHook`) that builds the
  :class:`~mixdit.pipelines.context.ForwardContext` for each call and lets features adjust the
  call's inputs/outputs (e.g. guidance adds perturbed rows);
* one :class:`~mixdit.attention.processor.MixditAttnProcessor` (via ``set_processor``) on each
  self-attention module that some feature wants.

``remove`` puts back the original processor objects and removes the hooks, so the pipeline's
output is bitwise what it was before ``apply``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from mixdit.attention.processor import AttentionCall, MixditAttnProcessor, parallelism_unsupported
from mixdit.errors import ConfigError, UnsupportedModelError
from mixdit.pipelines.adapters import AttentionSite, FamilyAdapter, adapter_for
from mixdit.pipelines.context import ForwardContext, reset_context, set_context

_HOOK_NAME = "mixdit.forward_context"
_CALL_NAME_HOOK = "mixdit.call_name"
_STATE_ATTR = "_mixdit_session"


class Feature:
    """Base class of an installable feature. Override what you need.

    * ``sites``: which attention sites this feature needs a processor on (default: none).
    * ``wants(site, ctx)``: whether to intercept this call (default: every site in ``sites``).
    * ``attend(call)``: compute the attention output ``[B, H, S, D]`` or return None to defer.
    * ``transform(call, out)``: adjust the output of whoever computed it.
    * ``pre_forward`` / ``post_forward``: adjust a denoiser call (batch rows, outputs).
    * ``summary()``: a JSON-ready dict for ``mixdit.summary``.
    """

    keyword: str = ""
    config_class: type = object
    supported_families: tuple[str, ...] | None = None  # None = every family with an adapter

    def __init__(self, config, adapter: FamilyAdapter, pipe):
        self.config, self.adapter, self.pipe = config, adapter, pipe
        self.sites_cache: set[AttentionSite] = set()  # filled at install time

    def sites(self, model, denoiser_name: str) -> list[AttentionSite]:
        return []

    def wants(self, site: AttentionSite, ctx: ForwardContext) -> bool:
        return True

    def attend(self, call: AttentionCall) -> torch.Tensor | None:
        return None

    def transform(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        return out

    def pre_forward(self, ctx: ForwardContext, model, args: tuple, kwargs: dict):
        return args, kwargs

    def post_forward(self, ctx: ForwardContext, model, output):
        return output

    def install(self, session: "Session") -> None:
        """Extra installation beyond processors and the context hook (rarely needed)."""

    def uninstall(self, session: "Session") -> None:
        pass

    def summary(self) -> dict:
        return {}


FEATURES: dict[str, type[Feature]] = {}


def register_feature(cls: type[Feature]) -> type[Feature]:
    """Class decorator: make ``cls`` available as ``mixdit.apply(pipe, <cls.keyword>=config)``."""
    FEATURES[cls.keyword] = cls
    return cls


def _load_builtin_features() -> None:
    # importing these modules registers their features
    import importlib

    for mod in ("mixdit.attention.vmoba_feature", "mixdit.guidance.perturbation"):
        importlib.import_module(mod)


class _ForwardContextHook(ModelHook):
    """Builds the forward context for each denoiser call and runs features' call-level hooks."""

    def __init__(self, session: "Session", denoiser_name: str):
        super().__init__()
        self.session, self.denoiser_name = session, denoiser_name
        self._token = None
        self._ctx: ForwardContext | None = None

    # Under torch.compile the per-call bookkeeping runs eagerly (a graph break): traced, its Python state (call
    # counts, the step, the rows' roles) would be guarded on and recompiled every call
    @torch.compiler.disable
    def pre_forward(self, module, *args, **kwargs):
        ctx = self.session.make_context(module, self.denoiser_name, args, kwargs)
        for feature in self.session.features:
            args, kwargs = feature.pre_forward(ctx, module, args, kwargs)
        self._ctx, self._token = ctx, set_context(ctx)
        return args, kwargs

    @torch.compiler.disable
    def post_forward(self, module, output):
        ctx, token = self._ctx, self._token
        self._ctx = self._token = None
        try:
            for feature in reversed(self.session.features):
                output = feature.post_forward(ctx, module, output)
        finally:
            if token is not None:
                reset_context(token)
        return output


def _call_name_hook():
    """A stateful hook whose only job is to read the pipeline's ``cache_context("cond" | "uncond")``
    name of each denoiser call (diffusers sets it on stateful hooks' state managers)."""
    from diffusers.hooks.hooks import BaseState, StateManager

    class _NoState(BaseState):
        def reset(self, *args, **kwargs):
            pass

    class CallNameHook(ModelHook):
        _is_stateful = True

        def __init__(self):
            super().__init__()
            self.state_manager = StateManager(_NoState)

        def reset_state(self, module):
            return module

        @property
        def call_name(self) -> str | None:
            ctx = self.state_manager._context
            return None if ctx is None else ctx.name

    return CallNameHook()


class Session:
    """What mixdit installed on one pipeline (stored on the pipeline; one at a time)."""

    def __init__(self, pipe, adapter: FamilyAdapter, features: list[Feature]):
        self.pipe, self.adapter, self.features = pipe, adapter, features
        self.original_processors: list[tuple[torch.nn.Module, Any]] = []
        self.hooked: list[torch.nn.Module] = []
        self.call_names: dict[int, ModelHook] = {}  # id(denoiser) -> its call-name hook
        self.num_layers: dict[int, int] = {}  # id(denoiser) -> layer count (fixed while installed)
        self._schedule: tuple[object, torch.Tensor] | None = None  # (scheduler tensor, its CPU copy)
        self.calls = 0

    # -- installation ----------------------------------------------------------------------
    def install(self) -> None:
        for name, model in self.adapter.denoisers(self.pipe):
            registry = HookRegistry.check_if_exists_or_initialize(model)
            call_name = _call_name_hook()
            registry.register_hook(call_name, _CALL_NAME_HOOK)
            self.call_names[id(model)] = call_name
            self.num_layers[id(model)] = self.adapter.num_layers(model)
            registry.register_hook(_ForwardContextHook(self, name), _HOOK_NAME)
            self.hooked.append(model)
            wanted: dict[int, AttentionSite] = {}
            for feature in self.features:
                sites = feature.sites(model, name)
                feature.sites_cache.update(sites)
                for site in sites:
                    wanted[id(site.module)] = site
            for site in wanted.values():
                original = site.module.processor
                self.original_processors.append((site.module, original))
                site.module.set_processor(MixditAttnProcessor(original, site, self))
        for feature in self.features:
            feature.install(self)

    def uninstall(self) -> None:
        for feature in reversed(self.features):
            feature.uninstall(self)
        for module, original in reversed(self.original_processors):
            module.set_processor(original)
        for model in self.hooked:
            registry = getattr(model, "_diffusers_hook", None)
            for hook_name in (_HOOK_NAME, _CALL_NAME_HOOK):
                if registry is not None and registry.get_hook(hook_name) is not None:
                    registry.remove_hook(hook_name, recurse=False)
        self.original_processors.clear()
        self.hooked.clear()
        self.call_names.clear()
        self.num_layers.clear()

    # -- per call --------------------------------------------------------------------------
    def make_context(self, model, denoiser_name: str, args: tuple, kwargs: dict) -> ForwardContext:
        self.calls += 1
        timestep = self.adapter.timestep(args, kwargs)
        step_index, num_steps = self._step_of(timestep)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        batch = int(hidden.shape[0]) if hidden is not None else 1
        hook = self.call_names.get(id(model))
        call_name = hook.call_name if hook is not None else None
        pipe = None if isinstance(self.pipe, torch.nn.Module) else self.pipe
        roles, cfg_scale = self.adapter.row_roles(pipe, denoiser_name, batch, call_name)
        return ForwardContext(
            family=self.adapter.family,
            denoiser_name=denoiser_name,
            step_index=step_index,
            num_steps=num_steps,
            timestep=timestep,
            grid=self.adapter.grid(model, args, kwargs),
            text_len=self.adapter.text_len(model, args, kwargs),
            text_position=self.adapter.text_position,
            batch_size=batch,
            row_roles=tuple(roles) if len(roles) == batch else None,
            num_layers=self.num_layers.get(id(model)) or self.adapter.num_layers(model),
            extras={"call_name": call_name, "cfg_scale": cfg_scale},
        )

    def _step_of(self, timestep: float | None) -> tuple[int | None, int | None]:
        """(step index, number of steps) of a call inside a pipeline's denoising loop, else (None, None).

        Pipelines that expose ``_current_timestep`` (FLUX, Wan, HunyuanVideo, CogVideoX) say
        whether the loop is running and its timestep; the index is the position of that timestep
        in the scheduler's schedule (SD3 keeps no loop state: the call's own timestep is looked up).
        """
        pipe = None if isinstance(self.pipe, torch.nn.Module) else self.pipe
        scheduler = getattr(pipe, "scheduler", None)
        schedule = getattr(scheduler, "timesteps", None)
        if timestep is None or schedule is None or len(schedule) == 0:
            return None, None
        if hasattr(pipe, "_current_timestep"):
            if pipe._current_timestep is None:
                return None, None  # a call outside the denoising loop (benchmarks, direct calls)
            # the loop's own timestep (FLUX passes t / 1000 to its transformer)
            current = pipe._current_timestep
            timestep = float(current.flatten()[0]) if torch.is_tensor(current) else float(current)
        if self._schedule is None or self._schedule[0] is not schedule:  # one copy per schedule, not per call
            self._schedule = (schedule, schedule.detach().float().cpu())
        distance = (self._schedule[1] - float(timestep)).abs()
        index = int(distance.argmin())
        if float(distance[index]) > 1e-3 * max(1.0, abs(float(timestep))):
            return None, None
        return index, len(schedule)

    def active_features(self, site: AttentionSite, ctx: ForwardContext) -> list[Feature]:
        """The features that take part in this attention call (asked once per call)."""
        return [f for f in self.features if site in f.sites_cache and f.wants(site, ctx)]

    def run_attention(self, call: AttentionCall, active: list[Feature]) -> torch.Tensor:
        out = None
        for feature in active:
            out = feature.attend(call)
            if out is not None:
                break
        if out is None:
            out = call.dense()
        for feature in active:
            out = feature.transform(call, out)
        return out

    def summary(self) -> dict:
        return {
            "family": self.adapter.family,
            "denoisers": [name for name, _ in self.adapter.denoisers(self.pipe)],
            "patched_attention_modules": len(self.original_processors),
            "denoiser_calls": self.calls,
            "features": {f.keyword: f.summary() for f in self.features},
        }


def apply(pipe, **features) -> Session:
    """Install mixdit features on a diffusers pipeline (or a bare denoiser) and return the session.

    Example: ``mixdit.apply(pipe, vmoba=VMoBAConfig(threshold=0.25))``. Each keyword takes the
    feature's config object (or a dict of its fields, or ``True`` for defaults). Applying again
    replaces what was installed before.
    """
    _load_builtin_features()
    adapter = adapter_for(pipe)
    instances: list[Feature] = []
    for keyword, config in features.items():
        if config is None or config is False:
            continue
        if keyword not in FEATURES:
            raise ConfigError(keyword, config, "a feature keyword: one of " + ", ".join(sorted(FEATURES)))
        cls = FEATURES[keyword]
        config = _coerce_config(keyword, cls.config_class, config)
        if cls.supported_families is not None and adapter.family not in cls.supported_families:
            raise UnsupportedModelError(
                f"{keyword} does not support the {adapter.family} family; supported: {', '.join(cls.supported_families)}")
        instances.append(cls(config, adapter, pipe))
    if instances:
        _check_not_parallel(adapter, pipe)
    remove(pipe)
    session = Session(pipe, adapter, instances)
    session.install()
    _set_session(pipe, session)
    return session


def _check_not_parallel(adapter, pipe) -> None:
    """Refuse denoisers already sharded by diffusers' ``enable_parallelism`` before anything is installed (sharded
    later, the processor refuses its calls: :func:`mixdit.attention.processor.parallelism_unsupported`)."""
    for name, model in adapter.denoisers(pipe):
        if getattr(model, "_parallel_config", None) is not None:
            raise parallelism_unsupported(f"the {name}")


def _coerce_config(keyword: str, config_class: type, config):
    if config is True:
        config = config_class()
    elif isinstance(config, dict):
        try:
            config = config_class(**config)
        except TypeError as e:
            raise ConfigError(keyword, config, f"fields of {config_class.__name__}") from e
    if not isinstance(config, config_class):
        raise ConfigError(keyword, config, f"a {config_class.__name__}, a dict of its fields, or True")
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def remove(pipe) -> None:
    """Undo :func:`apply`: original processors and hooks back, bitwise-identical outputs."""
    session = getattr(pipe, _STATE_ATTR, None)
    if session is not None:
        session.uninstall()
        _set_session(pipe, None)


def summary(pipe) -> dict:
    """What mixdit installed and what it did (e.g. achieved VMoBA density per layer type)."""
    session = getattr(pipe, _STATE_ATTR, None)
    if session is None:
        return {"features": {}}
    return session.summary()


def session_of(pipe) -> Session | None:
    return getattr(pipe, _STATE_ATTR, None)


def _set_session(pipe, session) -> None:
    # pipelines are ConfigMixin objects: plain attribute assignment keeps the config untouched
    object.__setattr__(pipe, _STATE_ATTR, session)
