"""Regenerate the README's pictures: docs/pca.png (`ditf pca`) and docs/app.png (`ditf app` after a click).

    PYTHONPATH=src .venv/bin/python docs/screenshots.py        # needs gradio, playwright and chromium

Both use the random-weight smoke model (built into a temporary folder, so the pictures say it is) at
`./run.sh demo`'s settings, on the bundled example images. The app is driven like tests/test_app_browser.py
does: load the examples, click the source's left eye.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
SETTINGS = ["--block", "28", "--t", "261", "--ensemble", "2", "--resolution", "256", "--dtype", "fp32", "--device", "cpu"]
CLICK = (186, 185)


def pca_figure(model: Path, examples: tuple[Path, Path]) -> None:
    from ditf.cli import main

    if main(["pca", *map(str, examples), "--model", str(model), "-o", str(DOCS / "pca.png"), *SETTINGS]) != 0:
        raise SystemExit("ditf pca failed")


def app_screenshot(model: Path, examples: tuple[Path, Path]) -> None:
    from playwright.sync_api import sync_playwright

    from ditf.app import FeatureStore, ModelLoader, build_app, launch
    from ditf.app.smoke_model import SMOKE_CONTROLS

    store = FeatureStore(ModelLoader("cpu"))
    app = build_app(store, store.settings(str(model), **SMOKE_CONTROLS), examples)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch(app, "127.0.0.1", port, allowed_paths=[examples[0].parent], block=False)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"),
                                                 args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1100, "height": 1200})
            page.set_default_timeout(120_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.click("#load-example")
            page.wait_for_selector("#source img")
            page.wait_for_selector("#targets img")
            image = page.locator("#source img").first
            box = image.bounding_box()
            width, height = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            scale = min(box["width"] / width, box["height"] / height, 1.0)
            left, top = (box["width"] - width * scale) / 2, (box["height"] - height * scale) / 2
            image.click(position={"x": left + (CLICK[0] + 0.25) * scale, "y": top + (CLICK[1] + 0.25) * scale})
            page.wait_for_function("() => (document.querySelector('#matches textarea')?.value ?? '').includes('target 1')")
            page.wait_for_selector("#results img")
            page.screenshot(path=str(DOCS / "app.png"), full_page=True)
            browser.close()
    finally:
        app.close()


def shrink(path: Path) -> None:
    """Rewrite the PNG with a 256-colour palette (a quarter of the size; the README shows it small anyway)."""
    from PIL import Image

    with Image.open(path) as picture:
        palette = picture.convert("RGB").quantize(256, dither=Image.Dither.NONE)
    palette.save(path, optimize=True)


def main() -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from ditf.app import bundled_examples, cached_smoke_model

    examples = bundled_examples()
    if examples is None:
        raise SystemExit("the example images are not installed (src/ditf/assets/)")
    with tempfile.TemporaryDirectory() as cache:
        model = cached_smoke_model(cache)
        pca_figure(model, examples)
        app_screenshot(model, examples)
    for picture in (DOCS / "pca.png", DOCS / "app.png"):
        shrink(picture)
    print(f"wrote {DOCS / 'pca.png'} and {DOCS / 'app.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
