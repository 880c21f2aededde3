"""`ditf app`: serve the interactive click-to-match page (gradio)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `app`."""
    parser = subparsers.add_parser(
        "app", help="interactive page: click a source point, see its matches and heat maps; PCA and massive-activation tabs"
    )
    parser.add_argument("--model", default=None,
                        help="preset alias, hub id or local folder (default: the random-weight smoke model, built offline)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="weights dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--cache", default=None, help="folder for the smoke model (default: ~/.cache/ditf)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the page and serve it until interrupted."""
    from ditf.app.settings import SMOKE_SETTINGS
    from ditf.app.store import FeatureStore, pretrained_loader
    from ditf.app.ui import build_app, bundled_examples, launch, require_gradio
    from ditf.cli.common import DTYPES
    from ditf.smoke_cache import cached_smoke_model

    require_gradio()
    model, settings = args.model, None
    if model is None:
        print("no --model: using the random-weight smoke model (matches are meaningless)")
        model, settings = str(cached_smoke_model(args.cache)), SMOKE_SETTINGS
    store = FeatureStore(pretrained_loader(args.device, DTYPES[args.dtype] if args.dtype else None))
    examples = bundled_examples()
    app = build_app(store, model, settings, examples)
    print(f"serving on http://{args.host}:{args.port} (Ctrl+C to stop)")
    launch(app, args.host, args.port, args.share, allowed_paths=[examples[0].parent] if examples else [])
    return 0
