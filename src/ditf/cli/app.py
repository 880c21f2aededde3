"""`ditf app`: serve the interactive click-to-match page (gradio, `pip install 'ditf[app]'`)."""

from __future__ import annotations

import argparse

from ditf.app.images import MAX_PIXELS
from ditf.cli.common import HelpFormatter, add_max_pixels, add_model_args, add_settings_args

DEFAULT_PORT = 7860
"""gradio's usual port."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `app`."""
    parser = subparsers.add_parser(
        "app", formatter_class=HelpFormatter,
        help="interactive page: click a source point, see its matches and heat maps; PCA and massive-activation tabs",
        description="Serve a page (gradio) where clicking a point on a source image shows the predicted point and "
                    "the full-resolution cosine heat map on every target image (the exact matcher, as `ditf match`), "
                    "with model, block, t, ensemble, resolution and variant controls, a PCA tab and a "
                    "massive-activation tab. Features are kept in memory per image, model and settings. Needs "
                    "gradio: pip install 'ditf[app]'.")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    server.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on (1..65535)")
    server.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    server.add_argument("--cache", help="folder for the smoke model served without --model "
                                        "(default: $DITF_CACHE_DIR, else ~/.cache/ditf)")
    add_model_args(parser, required=False,
                   model_help="preset alias (e.g. flux-dev), hub id, local diffusers folder or single-file checkpoint "
                              "(default: the random-weight smoke model, built offline into --cache; its matches are "
                              "meaningless)")
    settings_group = add_settings_args(  # no --discard: the page's variant control decides what is discarded
        parser, image_size=False, discard=False, max_pixels=False,
        title="DiTF settings: the controls' first values and fixed options (default: the model's preset)")
    settings_group.add_argument("--resolution", type=int, help="long image side in pixels")
    add_max_pixels(parser, default=MAX_PIXELS, help_text=f"largest upload in pixels (width x height; default: "
                                                         f"{MAX_PIXELS}); larger ones get a message in the page")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check every option, then build the page and serve it until interrupted."""
    from ditf.app.store import CONTROLS, FeatureStore, ModelLoader
    from ditf.cli.common import device_of, settings_overrides
    from ditf.errors import InvalidArgumentError

    if not 1 <= args.port <= 65535:
        raise InvalidArgumentError(f"--port {args.port} is outside 1..65535; gradio's usual port is {DEFAULT_PORT}.")
    if args.max_batch is not None and args.max_batch < 1:
        raise InvalidArgumentError(f"--max-batch {args.max_batch}: give at least 1 ensemble member per forward pass "
                                   "(leave it out to run all members at once).")
    loader = ModelLoader(device_of(args), args.dtype, config=args.config, weights_variant=args.weights_variant,
                         offload=args.offload)
    overrides = settings_overrides(args)
    for name in ("normalize", "modulate", "discard"):  # --variant is the radio's first value, set per event
        overrides.pop(name, None)
    controls = {name: overrides.pop(name) for name in CONTROLS if name in overrides}
    store = FeatureStore(loader, given=overrides, max_batch=args.max_batch, max_pixels=args.max_pixels)
    if args.model is not None:
        from ditf.loading import check_model

        check_model(args.model, needs=("transformer", "vae"), config=args.config)
        settings = store.settings(args.model, args.variant or "ditf", **{**smoke_controls(args.model), **controls})

    from ditf.app.examples import bundled_examples
    from ditf.app.ui import build_app, launch, require_gradio

    require_gradio()
    if args.model is None:
        from ditf.app.smoke_model import cached_smoke_model

        print("no --model: serving the random-weight smoke model (its matches are meaningless)")
        model = str(cached_smoke_model(args.cache))
        settings = store.settings(model, args.variant or "ditf", **{**smoke_controls(model), **controls})
    examples = bundled_examples()
    app = build_app(store, settings, examples)
    print(f"serving on http://{args.host}:{args.port} (Ctrl+C to stop)")
    try:
        launch(app, args.host, args.port, args.share, allowed_paths=[examples[0].parent] if examples else [])
    except OSError as err:
        raise InvalidArgumentError(f"--port {args.port} on --host {args.host} cannot be served ({err}); pass another "
                                   "--port, or stop what is using it.") from err
    return 0


def smoke_controls(model: str) -> dict[str, int]:
    """The page's first block, t, ensemble and resolution for a smoke model without a preset (`./run.sh demo`'s);
    nothing for other models (their preset, or the flags, decide)."""
    from ditf.app.smoke_model import SMOKE_CONTROLS
    from ditf.registry import preset_for
    from ditf.smoke import is_smoke_model

    return dict(SMOKE_CONTROLS) if preset_for(model) is None and is_smoke_model(model) else {}
