"""mixdit: faster, better diffusers DiTs.

    import mixdit
    pipe = mixdit.load_pipeline("tiny-wan")
    mixdit.apply(pipe, vmoba=mixdit.VMoBAConfig())
    video = pipe("a red square moving right", num_inference_steps=4).frames[0]
    print(mixdit.summary(pipe))
    mixdit.remove(pipe)
"""

__version__ = "0.1.0"

from .errors import ConfigError, MixditError, ModelNotFoundError, UnsupportedModelError  # noqa: E402

_LAZY = {
    "apply": ("mixdit.api", "apply"),
    "remove": ("mixdit.api", "remove"),
    "summary": ("mixdit.api", "summary"),
    "Feature": ("mixdit.api", "Feature"),
    "register_feature": ("mixdit.api", "register_feature"),
    "load_pipeline": ("mixdit.pipelines.zoo", "load_pipeline"),
    "list_builtin_models": ("mixdit.pipelines.zoo", "list_builtin_models"),
    "ForwardContext": ("mixdit.pipelines.context", "ForwardContext"),
    "current_context": ("mixdit.pipelines.context", "current_context"),
    "VMoBAConfig": ("mixdit.attention.vmoba", "VMoBAConfig"),
    "GuidanceConfig": ("mixdit.guidance.perturbation", "GuidanceConfig"),
}


def __getattr__(name):  # import heavy modules (diffusers, triton) only when used
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mixdit' has no attribute {name!r}")


__all__ = ["ConfigError", "MixditError", "ModelNotFoundError", "UnsupportedModelError", *_LAZY]
