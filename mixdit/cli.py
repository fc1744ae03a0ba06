"""The ``mixdit`` command line.

    mixdit generate "a red square moving right" --model tiny-wan --out clip.mp4
    mixdit models
    mixdit heads search ...        (guidance/cli.py)
    mixdit train vmoba ...         (attention/vmoba_train_cli.py)

Feature modules plug in their own flags: each module in ``FEATURE_CLI_MODULES`` may define
``add_generate_arguments(parser)``, ``features_from_args(args) -> dict`` and
``register_commands(subparsers)``. Errors a user can fix print one line and exit with code 2
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mixdit.errors import MixditError

# order matters where two modules add subcommands under one command (`train vmoba`, then `train testbed`)
FEATURE_CLI_MODULES = ("mixdit.attention.vmoba_cli", "mixdit.guidance.cli", "mixdit.attention.vmoba_train_cli",
                       "mixdit.pipelines.testbed_cli", "mixdit.batch", "mixdit.ui.cli")
DEFAULT_MODEL = "mixdit-shapes-video"  # offline, trained by mixdit, under a minute on a CPU


def _feature_modules():
    mods = []
    for name in FEATURE_CLI_MODULES:
        try:
            mods.append(importlib.import_module(name))
        except ModuleNotFoundError as e:  # a feature whose CLI does not exist yet
            if e.name != name:
                raise
    return mods


def add_generation_options(p) -> None:
    """The generation options ``mixdit generate`` and ``mixdit batch`` share (each adds its own prompt
    argument and ``--out``, then :func:`add_feature_arguments`)."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="built-in name (see `mixdit models`), random:<arch>, a hub id or a local folder "
                        f"(default: {DEFAULT_MODEL}, mixdit's own trained text-to-video testbed model: offline, "
                        "under a minute on a CPU)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--frames", type=int, default=None, help="video frames (video models)")
    p.add_argument("--fps", type=int, default=16, help="frames per second of the written video")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale w")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on GPU)")


def add_feature_arguments(p, modules) -> None:
    """Every feature module's ``mixdit generate`` flags (``--vmoba...``, ``--heads...``)."""
    for mod in modules:
        if hasattr(mod, "add_generate_arguments"):
            mod.add_generate_arguments(p)


def features_from_args(args, modules) -> dict:
    """Feature keyword -> config from the parsed feature flags (raises ConfigError on a bad flag)."""
    features = {}
    for mod in modules:
        if hasattr(mod, "features_from_args"):
            features.update(mod.features_from_args(args))
    return features


def request_from_args(args, modules, prompt: str):
    """The :class:`~mixdit.generate.GenerationRequest` the parsed generation options describe."""
    from mixdit.generate import GenerationRequest

    features = features_from_args(args, modules)
    return GenerationRequest(prompt=prompt, model=args.model, negative_prompt=args.negative_prompt,
                             steps=args.steps, seed=args.seed, height=args.height, width=args.width,
                             frames=args.frames, fps=args.fps, guidance_scale=args.guidance_scale,
                             device=args.device, dtype=args.dtype, features=features)


def _add_generate(subparsers, modules) -> None:
    p = subparsers.add_parser("generate", help="generate an image or a video from a prompt",
                              description="Generate an image (PNG with metadata) or a video (MP4/GIF/WebP).")
    p.add_argument("prompt", help="what to generate")
    add_generation_options(p)
    p.add_argument("--out", default=None, help="output file (.png; videos: .mp4, .gif, .webp); default: outputs/<time>-<prompt>.png|mp4")
    add_feature_arguments(p, modules)
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args, modules) -> int:
    request = request_from_args(args, modules, args.prompt)
    request.validate()  # before the (slow) imports and model load
    if args.out is not None:
        from mixdit.pipelines.output import check_output_path

        check_output_path(args.out)
    from mixdit.generate import default_output_path, run_generation
    from mixdit.pipelines.adapters import adapter_for
    from mixdit.pipelines.output import save_result
    from mixdit.pipelines.zoo import load_pipeline

    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    is_video = adapter_for(pipe).is_video
    result, meta, seconds = run_generation(pipe, request)
    path = args.out or default_output_path(request, is_video)
    written = save_result(result, path, meta, fps=args.fps if is_video else None)
    for w in written:
        print(w)
    print(f"done in {seconds:.1f} s")
    return 0


def _cmd_models(args, modules) -> int:
    from mixdit.pipelines.zoo import list_builtin_models

    for name in list_builtin_models():
        print(name)
    return 0


def _quiet_libraries() -> None:
    """Keep the terminal to what matters: our result line, the denoising progress bar, errors.

    Takes effect when diffusers / transformers are first imported, so an argument error is reported without
    importing them (~4 s on a CPU): verbosity through their environment variables, the component-loading
    progress bars switched off right after their logging modules load."""
    import os
    import warnings

    for var, value in (("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"), ("DIFFUSERS_VERBOSITY", "error"),
                       ("TRANSFORMERS_VERBOSITY", "error")):
        os.environ.setdefault(var, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        _after_import(name, lambda module: module.disable_progress_bar())


def _after_import(name: str, fn) -> None:
    """Call ``fn(module)`` once module ``name`` is imported (now, if it already is)."""
    import importlib.abc
    import importlib.util

    if name in sys.modules:
        fn(sys.modules[name])
        return

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)  # one shot; the real finders locate the module
            spec = importlib.util.find_spec(fullname)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                exec_module = spec.loader.exec_module

                def exec_then_call(module):
                    exec_module(module)
                    fn(module)

                spec.loader.exec_module = exec_then_call
            return spec

    sys.meta_path.insert(0, Finder())


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the flag and what it takes, no usage dump), exit code 2; subcommands'
    parsers are of the same class."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(modules=None) -> argparse.ArgumentParser:
    modules = _feature_modules() if modules is None else modules
    parser = _Parser(prog="mixdit", description="Faster, better diffusers DiTs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate(sub, modules)
    models = sub.add_parser("models", help="list the built-in model names")
    models.set_defaults(func=_cmd_models)
    for mod in modules:
        if hasattr(mod, "register_commands"):
            mod.register_commands(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    modules = _feature_modules()
    parser = build_parser(modules)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, its one line already printed)
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if not args.debug:
        _quiet_libraries()
    try:
        return int(args.func(args, modules) or 0)
    except MixditError as e:
        if args.debug:
            raise
        print(f"mixdit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mixdit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
