"""The Gradio web UI: ``build_app(...) -> gradio.Blocks`` (``mixdit ui`` launches it).

Everything the UI does is in :mod:`mixdit.ui.logic` (plain functions, tested without a browser);
this module lays out the components and wires the events:

* model change (dropdown, or the folder / hub id box) -> defaults of that model (steps, CFG, size,
  frames), the video fields and the VMoBA panel shown only where they apply;
* a preset upload -> the guidance fields filled from the HeadHunter preset;
* Generate -> :meth:`Runner.generate` with a progress bar; a bad value raises ``gr.Error`` with the
  one-line ``ConfigError`` message (field, value, what is allowed), inputs untouched.
"""

from __future__ import annotations

import logging

import gradio as gr

from mixdit.errors import MixditError
from mixdit.ui.logic import DEFAULT_OUTPUTS, DEFAULT_PROMPT, Form, Runner, model_info

log = logging.getLogger("mixdit.ui")

DEVICES = ["auto", "cpu", "cuda"]
DTYPES = ["auto", "float32", "bfloat16", "float16"]
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def _default_model() -> str:
    from mixdit.cli import DEFAULT_MODEL

    return DEFAULT_MODEL


def _user_error(exc: BaseException) -> gr.Error:
    """One readable message, never a traceback (the server log keeps it for unexpected errors)."""
    if isinstance(exc, MixditError):
        return _error(str(exc))
    log.exception("generation failed")
    return _error(f"generation failed: {type(exc).__name__}: {exc}")


def _error(message: str) -> gr.Error:
    try:
        return gr.Error(message, print_exception=False)
    except TypeError:  # gradio releases before print_exception
        return gr.Error(message)


def model_updates(name: str) -> tuple:
    """Updates for (note, steps, guidance_scale, width, height, frames, video_row, vmoba_box, vmoba,
    image_out, video_out) when the model changes."""
    info = model_info(name)
    d = info.defaults
    video = info.show_video_fields
    vmoba = info.supports_vmoba
    return (
        gr.update(value=info.describe()),
        gr.update(value=d.get("steps")),
        gr.update(value=d.get("guidance_scale")),
        gr.update(value=d.get("width")),
        gr.update(value=d.get("height")),
        gr.update(value=d.get("frames") if video else None),
        gr.update(visible=video),
        gr.update(visible=vmoba),
        gr.update() if vmoba else gr.update(value=False),
        gr.update(visible=info.is_video is not True),
        gr.update(visible=video),
    )


def preset_updates(path):
    """Fill the guidance fields (heads, scale, u, mode; guidance on) from an uploaded preset JSON."""
    if not path:
        return gr.update(), gr.update(), gr.update(), gr.update(), gr.update()
    from mixdit.guidance.config import config_from_preset

    try:
        cfg = config_from_preset(path)
    except MixditError as e:
        raise _user_error(e) from None
    return (gr.update(value=True), gr.update(value=cfg.to_dict()["heads"]), gr.update(value=cfg.scale),
            gr.update(value=cfg.softpag), gr.update(value=cfg.mode))


def build_app(runner: Runner | None = None, *, model: str | None = None, device: str = "auto",
              dtype: str | None = None, outputs_dir: str = DEFAULT_OUTPUTS, max_pipelines: int = 1) -> gr.Blocks:
    """The mixdit web UI. ``runner`` (default: a new :class:`Runner` writing to ``outputs_dir``)
    holds the pipeline cache; ``model``/``device``/``dtype`` preselect the controls."""
    from mixdit.attention.vmoba_config import GRANULARITIES, SELECTIONS
    from mixdit.guidance.config import MODES
    from mixdit.pipelines.zoo import list_builtin_models

    runner = runner if runner is not None else Runner(outputs_dir, max_pipelines=max_pipelines)
    model = model or _default_model()
    builtins = list_builtin_models()
    start_choice = model if model in builtins else _default_model()
    start_path = "" if model in builtins else model
    info = model_info(model)
    d = info.defaults
    f0 = Form()  # the feature and output defaults (the CLI's and the config classes')
    dtype_choice = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower()) if dtype else "auto"
    device_choices = DEVICES if device in DEVICES else DEVICES + [device]
    dtype_choices = DTYPES if dtype_choice in DTYPES else DTYPES + [dtype_choice]

    with gr.Blocks(title="mixdit", analytics_enabled=False) as app:
        gr.Markdown("## mixdit\nGenerate with diffusers DiTs, VMoBA sparse attention and head perturbation guidance. "
                    "Offline models: `mixdit-shapes-video` / `mixdit-shapes-image` (trained testbed models) and "
                    "`tiny-*` (random weights: noise, for trying code paths).")
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Row():
                    model_dd = gr.Dropdown(builtins, value=start_choice, label="Model")
                    model_path = gr.Textbox(value=start_path, label="…or a local folder / hub id",
                                            placeholder="path/to/diffusers-folder (overrides the list)")
                note = gr.Markdown(info.describe())
                prompt = gr.Textbox(value=DEFAULT_PROMPT, label="Prompt", lines=2)
                negative = gr.Textbox(value="", label="Negative prompt")
                with gr.Row():
                    seed = gr.Number(value=f0.seed, precision=0, label="Seed")
                    random_seed = gr.Checkbox(value=False, label="Random seed")
                with gr.Row():
                    steps = gr.Number(value=d.get("steps"), precision=0, label="Steps",
                                      info="empty: the model's default")
                    guidance_scale = gr.Number(value=d.get("guidance_scale"), label="Guidance scale (CFG)",
                                               step=0.5)
                with gr.Row():
                    width = gr.Number(value=d.get("width"), precision=0, label="Width", step=16)
                    height = gr.Number(value=d.get("height"), precision=0, label="Height", step=16)
                with gr.Row(visible=info.show_video_fields) as video_row:
                    frames = gr.Number(value=d.get("frames"), precision=0, label="Frames",
                                       info="Wan / HunyuanVideo: 4k+1")
                    fps = gr.Number(value=f0.fps, precision=0, label="FPS (written video)")
                with gr.Accordion("VMoBA sparse video attention", open=False,
                                  visible=info.supports_vmoba) as vmoba_box:
                    vmoba = gr.Checkbox(value=False, label="Use VMoBA")
                    with gr.Row():
                        vmoba_threshold = gr.Number(value=f0.vmoba_threshold, label="Threshold τ", step=0.05,
                                                    info="share of the gate mass to cover, in [0, 1]")
                        vmoba_dense_steps = gr.Number(value=f0.vmoba_dense_steps, label="Dense steps", step=0.01,
                                                      info="first steps kept dense: a fraction < 1 or a count")
                    with gr.Row():
                        vmoba_selection = gr.Dropdown(list(SELECTIONS), value=f0.vmoba_selection, label="Selection")
                        vmoba_granularity = gr.Dropdown(list(GRANULARITIES), value=f0.vmoba_granularity, label="Granularity",
                                                        info="query_tile: faster approximation on a GPU")
                with gr.Accordion("Head perturbation guidance", open=False):
                    guidance = gr.Checkbox(value=False, label="Use head perturbation guidance")
                    with gr.Row():
                        heads = gr.Textbox(value="", label="Heads", placeholder="L13H18,L14H*,L2")
                        heads_preset = gr.File(label="…or a HeadHunter preset JSON", file_types=[".json"],
                                               type="filepath")
                    with gr.Row():
                        perturb_scale = gr.Number(value=f0.perturb_scale, label="Scale s", step=0.5)
                        softpag = gr.Number(value=f0.softpag, label="SoftPAG u", step=0.1, info="in [0, 1]")
                        perturb_mode = gr.Dropdown(list(MODES), value=f0.perturb_mode, label="Mode")
                with gr.Accordion("Device", open=False):
                    with gr.Row():
                        device_dd = gr.Dropdown(device_choices, value=device, label="Device")
                        dtype_dd = gr.Dropdown(dtype_choices, value=dtype_choice, label="Dtype",
                                               info="auto: fp32 on CPU, bf16 on GPU")
                generate = gr.Button("Generate", variant="primary")
            with gr.Column(scale=1):
                image_out = gr.Image(label="Image", type="filepath", interactive=False,
                                     visible=info.is_video is not True)
                video_out = gr.Video(label="Video", interactive=False, visible=info.show_video_fields)
                summary = gr.Markdown("")
                files_out = gr.File(label="Files", file_count="multiple", interactive=False)
                meta_out = gr.JSON(label="Metadata")

        form_inputs = [model_dd, model_path, prompt, negative, seed, random_seed, steps, guidance_scale, width,
                       height, frames, fps, vmoba, vmoba_threshold, vmoba_dense_steps, vmoba_selection,
                       vmoba_granularity, guidance, heads, heads_preset, perturb_scale, softpag, perturb_mode,
                       device_dd, dtype_dd]
        assert len(form_inputs) == len(Form.field_names())

        model_outputs = [note, steps, guidance_scale, width, height, frames, video_row, vmoba_box, vmoba,
                         image_out, video_out]

        def on_model_choice(name):
            return (gr.update(value=""),) + model_updates(name)

        def on_model_path(path, name):
            return model_updates((path or "").strip() or name)

        model_dd.input(on_model_choice, [model_dd], [model_path] + model_outputs, api_name="model_defaults")
        model_path.submit(on_model_path, [model_path, model_dd], model_outputs, api_name=False)
        model_path.blur(on_model_path, [model_path, model_dd], model_outputs, api_name=False)
        heads_preset.upload(preset_updates, [heads_preset], [guidance, heads, perturb_scale, softpag, perturb_mode],
                            api_name=False)

        def on_generate(model, model_path, prompt, negative_prompt, seed, random_seed, steps, guidance_scale, width,
                        height, frames, fps, vmoba, vmoba_threshold, vmoba_dense_steps, vmoba_selection,
                        vmoba_granularity, guidance, heads, heads_preset, perturb_scale, softpag, perturb_mode,
                        device, dtype, progress=gr.Progress()):
            # Progress is found by gradio as a positional parameter with a gr.Progress() default
            form = Form(model=model, model_path=model_path, prompt=prompt, negative_prompt=negative_prompt,
                        seed=seed, random_seed=random_seed, steps=steps, guidance_scale=guidance_scale,
                        width=width, height=height, frames=frames, fps=fps, vmoba=vmoba,
                        vmoba_threshold=vmoba_threshold, vmoba_dense_steps=vmoba_dense_steps,
                        vmoba_selection=vmoba_selection, vmoba_granularity=vmoba_granularity, guidance=guidance,
                        heads=heads, heads_preset=heads_preset, perturb_scale=perturb_scale, softpag=softpag,
                        perturb_mode=perturb_mode, device=device, dtype=None if dtype == "auto" else dtype)
            try:
                result = runner.generate(form, progress=lambda value, desc: progress(value, desc=desc))
            except Exception as e:  # noqa: BLE001 - every failure becomes one message in the UI
                raise _user_error(e) from None
            path = str(result.path)
            return (gr.update(value=None if result.is_video else path, visible=not result.is_video),
                    gr.update(value=path if result.is_video else None, visible=result.is_video),
                    result.summary, [str(f) for f in result.files], result.metadata)

        generate.click(on_generate, form_inputs, [image_out, video_out, summary, files_out, meta_out],
                       api_name="generate", concurrency_limit=1)

    app.mixdit_runner = runner  # for tests and embedding
    app.mixdit_form_inputs = form_inputs
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           outputs_dir: str = DEFAULT_OUTPUTS, **kwargs):
    """Queue (progress bars need it) and serve ``app``; the outputs folder may be served."""
    import os

    return app.queue().launch(server_name=host, server_port=port, share=share,
                              allowed_paths=[os.path.abspath(outputs_dir)], **kwargs)
