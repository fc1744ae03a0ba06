"""``mixdit ui``: start the Gradio web UI (gradio is imported only when the command runs)."""

from __future__ import annotations


def register_commands(subparsers) -> None:
    from mixdit.cli import DEFAULT_MODEL

    p = subparsers.add_parser("ui", help="start the Gradio web UI",
                              description="Serve the mixdit web UI (offline; pipelines are loaded on the first "
                                          "Generate and kept for the next ones).")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs the internet)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (preselected in the UI)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model preselected in the UI: a built-in name, a local folder or a hub id "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--outputs", default="outputs", help="folder the generated files are saved in (default: outputs)")
    p.add_argument("--max-pipelines", type=int, default=1,
                   help="loaded pipelines kept in memory, least recently used dropped first (default 1)")
    p.set_defaults(func=_cmd_ui)


def _cmd_ui(args, modules=None) -> int:
    from mixdit.config import check_number
    from mixdit.pipelines.zoo import resolve_device, resolve_dtype

    # everything a user can get wrong is checked before gradio starts
    check_number("port", args.port, 1, 65535, integer=True)
    check_number("max_pipelines", args.max_pipelines, 1, integer=True)
    resolve_dtype(args.dtype, resolve_device(args.device))

    from mixdit.ui.app import build_app, launch

    app = build_app(model=args.model, device=args.device, dtype=args.dtype, outputs_dir=args.outputs,
                    max_pipelines=args.max_pipelines)
    launch(app, host=args.host, port=args.port, share=args.share, outputs_dir=args.outputs)
    return 0
