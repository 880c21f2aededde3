"""The gradio page of `ditf app`: components, layout and the wiring of events to `ditf.app.callbacks`.

gradio is imported inside `build_app` (`require_gradio`), so this module imports without gradio installed and
`ditf app` can say how to install it.
"""

# No `from __future__ import annotations` here: gradio finds the click's `evt: gr.SelectData` parameter by
# evaluating annotations, which fails for a string naming the function-local `gr`.
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ditf.app import callbacks
from ditf.app.store import FeatureStore
from ditf.errors import DitfError
from ditf.settings import VARIANTS, FeatureSettings
from ditf.smoke import is_smoke_model

MAX_UPLOAD = "64mb"
"""Largest upload file the server accepts (pixels are limited separately: `FeatureStore.max_pixels`)."""


class GradioMissingError(DitfError):
    """gradio, needed only by `ditf app`, is not installed."""


def require_gradio() -> Any:
    """The gradio module, or `GradioMissingError` saying how to install it."""
    try:
        import gradio
    except ImportError as err:
        raise GradioMissingError(
            "`ditf app` needs gradio, which is not installed; install it with pip install 'ditf[app]' "
            "(in a checkout: pip install -e '.[app]')."
        ) from err
    return gradio


def model_banner(model: str) -> str:
    """HTML above the page: the model in use, and a loud warning when it is the random-weight smoke model."""
    name = html.escape(model or "(none)")
    if model and is_smoke_model(model.strip()):
        return (
            '<div id="smoke-warning" style="background:#b91c1c;color:white;padding:8px 12px;border-radius:6px;'
            'font-weight:600">random-weight smoke model: matches are meaningless '
            f"(it only shows that the app works; start with --model flux-dev for real features). Model: {name}</div>"
        )
    return f'<div id="model-banner" style="padding:4px 0">Model: <code>{name}</code></div>'


def build_app(store: FeatureStore, settings: FeatureSettings, examples: tuple[Path, Path] | None = None) -> Any:
    """The page as a `gradio.Blocks` (not launched). `store` loads the models and keeps the features;
    `settings` (resolved for a model, e.g. by `store.settings`) fill the model box and the controls;
    `examples` (source, target) adds a button that loads them (pass their folder to `launch(allowed_paths=)`)."""
    gr = require_gradio()
    model = settings.model or ""

    def on_select(source: Any, targets: Any, model_text: str, block: Any, t: Any, ensemble: Any, resolution: Any,
                  variant: Any, evt: gr.SelectData) -> tuple[Any, Any, str]:
        view = callbacks.click(store, source, targets, evt.index, model_text, block, t, ensemble, resolution, variant)
        if view.error:
            gr.Warning(view.status)
            return gr.update(), gr.update(), view.status
        return view.pictures, view.matches, view.status

    def on_pca(source: Any, targets: Any, model_text: str, block: Any, t: Any, ensemble: Any, resolution: Any,
               variant: Any, foreground: bool) -> tuple[Any, str]:
        view = callbacks.pca(store, source, targets, model_text, block, t, ensemble, resolution, variant, foreground)
        if view.error:
            gr.Warning(view.status)
            return gr.update(), view.status
        return view.pictures, view.status

    def on_massive(source: Any, model_text: str, block: Any, t: Any, ensemble: Any,
                   resolution: Any) -> tuple[Any, Any, str]:
        view = callbacks.massive(store, source, model_text, block, t, ensemble, resolution)
        if view.error:
            gr.Warning(view.status)
            return gr.update(), gr.update(), view.status
        return view.figure, view.summary, view.status

    def on_model(model_text: str) -> tuple[Any, ...]:
        """A new model: its banner, and its preset's block, t, ensemble and resolution (none: keep the controls)."""
        banner = model_banner((model_text or "").strip())
        try:
            preset = store.settings(model_text)
        except DitfError:
            return banner, gr.update(), gr.update(), gr.update(), gr.update()
        return banner, preset.block, preset.t, preset.ensemble, preset.resolution

    def on_new_source() -> tuple[Any, str]:
        return None, ""

    with gr.Blocks(title="ditf: click to match") as app:
        banner = gr.HTML(model_banner(model))
        gr.Markdown("Click a point on the **source** image: its best match (exact full-resolution cosine argmax) "
                    "and cosine heat map appear for every **target**.")
        with gr.Row():
            model_box = gr.Textbox(value=model, label="model: preset alias, hub id or local folder (Enter to apply)",
                                   scale=3, elem_id="model")
            variant = gr.Radio(list(VARIANTS), value=settings.variant if settings.variant in VARIANTS else "ditf",
                               label="variant: raw, + LayerNorm, + AdaLN, + discard (DiTF)", scale=2, elem_id="variant")
        with gr.Row():
            block = gr.Number(value=settings.block, precision=0, label="block k", elem_id="block")
            t = gr.Number(value=settings.t, label="t (0..1000)", elem_id="t")
            ensemble = gr.Number(value=settings.ensemble, precision=0, label="ensemble", elem_id="ensemble")
            resolution = gr.Number(value=settings.resolution, precision=0, label="resolution (long side, px)",
                                   elem_id="resolution")
        status = gr.Textbox(label="status", interactive=False, elem_id="status")
        with gr.Tabs():
            with gr.Tab("match"):
                if examples is not None:
                    example_button = gr.Button("load the example images (cat1 -> cat2)", size="sm",
                                               elem_id="load-example")
                with gr.Row():
                    source = gr.Image(type="filepath", sources=["upload"], label="source: click a point",
                                      elem_id="source")
                    targets = gr.Gallery(type="filepath", interactive=True, file_types=["image"], columns=2,
                                         object_fit="contain", label="targets (one or more)", elem_id="targets")
                matches = gr.Textbox(label="matches (x, y in pixels)", lines=3, interactive=False, elem_id="matches")
                results = gr.Gallery(label="source point and target heat maps", columns=3, format="jpeg",
                                     object_fit="contain", interactive=False, elem_id="results")
            with gr.Tab("PCA"):
                with gr.Row():
                    foreground = gr.Checkbox(label="foreground only (DINOv2-style: black background)")
                    pca_button = gr.Button("PCA pictures of the source and targets", elem_id="pca-button")
                pca_gallery = gr.Gallery(label="first three principal components as RGB, fitted jointly", columns=3,
                                         format="png", object_fit="contain", interactive=False, elem_id="pca")
            with gr.Tab("massive activations"):
                massive_button = gr.Button("profile the source's raw block input", elem_id="massive-button")
                massive_summary = gr.Textbox(label="massive channels", interactive=False, elem_id="massive-summary")
                massive_plot = gr.Plot(label="median |z| per channel", elem_id="massive-plot")

        controls = [model_box, block, t, ensemble, resolution]
        source.select(on_select, [source, targets, *controls, variant], [results, matches, status])
        source.upload(on_new_source, None, [results, matches])
        pca_button.click(on_pca, [source, targets, *controls, variant, foreground], [pca_gallery, status])
        massive_button.click(on_massive, [source, *controls], [massive_plot, massive_summary, status])
        model_box.submit(on_model, [model_box], [banner, block, t, ensemble, resolution])
        if examples is not None:
            example_button.click(lambda: (str(examples[0]), [str(examples[1])], None, ""), None,
                                 [source, targets, results, matches])
    return app


def launch(app: Any, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           allowed_paths: Sequence[Path] = (), block: bool = True) -> Any:
    """Serve `app` on host:port (a public gradio link with `share`); `block=False` returns at once."""
    return app.launch(server_name=host, server_port=port, share=share, allowed_paths=[str(p) for p in allowed_paths],
                      max_file_size=MAX_UPLOAD, prevent_thread_lock=not block, quiet=not block)
