"""`ditf app` driven in headless Chromium: upload, click, read the predicted point off the page.

The page is served by this process (gradio's background thread) with the random-weight smoke model at tiny
settings; Chromium is Debian's, driven by Playwright (`.ci/install-browser` installs both; gradio comes with
the `app` extra). Without them the module is skipped with the reason, except where the browser test is
required (`DITF_REQUIRE_BROWSER=1`, set by `.ci/run`, or `CI`): there it fails. The screenshot goes to
`$DITF_TEST_ARTIFACTS` when set, else to pytest's temporary folder; its path is printed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
from pathlib import Path

import pytest
from smoke_model_fixture import SMOKE_ARGS, SMOKE_CONTROLS, smoke_model_folder

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def browser_required() -> bool:
    """Whether a missing browser is a failure here (CI) rather than a reason to skip (a developer machine)."""
    flags = (os.environ.get("DITF_REQUIRE_BROWSER", ""), os.environ.get("CI", ""))
    return any(flag.strip().lower() not in ("", "0", "false", "no") for flag in flags)


def missing_parts() -> list[str]:
    """What the browser test needs and this machine lacks, each with how to get it."""
    missing = []
    if shutil.which("chromium") is None:
        missing.append("Debian's chromium (run .ci/install-browser)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("playwright (run .ci/install-browser)")
    if importlib.util.find_spec("gradio") is None:
        missing.append("gradio (pip install -e '.[app]')")
    return missing


MISSING = missing_parts()
MISSING_REASON = "the browser test needs " + ", ".join(MISSING)
if MISSING and not browser_required():
    pytest.skip(MISSING_REASON, allow_module_level=True)

from ditf.app import FeatureStore, ModelLoader  # noqa: E402
from ditf.cli import main  # noqa: E402

EXAMPLES = Path(__file__).parent.parent / "examples"
SOURCE, TARGET = EXAMPLES / "cat1.jpg", EXAMPLES / "cat2.jpg"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def smoke_model_dir(tmp_path_factory) -> Path:
    return smoke_model_folder(tmp_path_factory)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_everything_the_browser_test_needs_is_installed():
    """Here the browser test is required (or everything is installed): a missing part fails, naming the fix."""
    assert not MISSING, f"{MISSING_REASON}; it is required here (DITF_REQUIRE_BROWSER or CI is set)"


@pytest.fixture(scope="module")
def app_url(smoke_model_dir):
    if MISSING:
        pytest.fail(MISSING_REASON, pytrace=False)
    from ditf.app.ui import build_app, launch

    store = FeatureStore(ModelLoader("cpu"))
    app = build_app(store, store.settings(str(smoke_model_dir), **SMOKE_CONTROLS))
    port = free_port()
    launch(app, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def page(app_url):
    from playwright import sync_api

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 1400})
        page.set_default_timeout(WAIT_MS)
        page.goto(app_url)
        yield page
        browser.close()


def artefact_folder(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("DITF_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def text_of(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea").input_value()


def click_source_pixel(page, x: int, y: int) -> None:
    """Click the displayed source image where pixel (x, y) of the original is drawn (the image is scaled down
    to fit its box, never up, and centred in it: the page's own mapping, inverted)."""
    image = page.locator("#source img").first
    box = image.bounding_box()
    natural_width, natural_height = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    scale = min(box["width"] / natural_width, box["height"] / natural_height, 1.0)
    left = (box["width"] - natural_width * scale) / 2
    top = (box["height"] - natural_height * scale) / 2
    image.click(position={"x": left + (x + 0.25) * scale, "y": top + (y + 0.25) * scale})


def wait_for_text(page, elem_id: str, needle: str) -> None:
    page.wait_for_function(
        "([id, needle]) => (document.querySelector(`#${id} textarea`)?.value ?? '').includes(needle)",
        arg=[elem_id, needle])


def test_clicked_point_matches_ditf_match(page, smoke_model_dir, tmp_path, capsys):
    page.locator("#source input[type=file]").set_input_files(str(SOURCE))
    page.locator("#targets input[type=file]").set_input_files(str(TARGET))
    page.wait_for_selector("#source img")
    page.wait_for_selector("#targets img")
    click_source_pixel(page, 186, 185)
    wait_for_text(page, "matches", "target 1:")
    matches = text_of(page, "matches")
    source = tuple(int(v) for v in re.search(r"source: \((\d+), (\d+)\)", matches).groups())
    shown = [int(v) for v in re.search(r"target 1: \((\d+), (\d+)\)", matches).groups()]
    assert abs(source[0] - 186) <= 1 and abs(source[1] - 185) <= 1  # the page read the click where we made it
    page.wait_for_selector("#results img")
    screenshot = artefact_folder(tmp_path) / "app_after_click.png"
    page.screenshot(path=str(screenshot), full_page=True)

    capsys.readouterr()
    assert main(["match", str(SOURCE), str(TARGET), "--points", f"{source[0]},{source[1]}",
                 "--model", str(smoke_model_dir), "-o", str(tmp_path / "match.png"), *SMOKE_ARGS]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shown == expected["target"][0]
    with capsys.disabled():
        print(f"\nscreenshot of the app after a click: {screenshot}")


def test_a_second_click_answers_from_the_store(page):
    click_source_pixel(page, 250, 120)
    wait_for_text(page, "matches", "source: (250, 120)")
    assert "cached features" in text_of(page, "status")


def test_a_model_that_fails_to_load_shows_a_message_and_the_page_keeps_working(page, smoke_model_dir):
    model_box = page.locator("#model input, #model textarea").first
    model_box.fill(str(smoke_model_dir) + "-missing")
    click_source_pixel(page, 60, 60)
    wait_for_text(page, "status", "smoke-flux-missing")
    assert text_of(page, "status").startswith("error: model ") and "no such file or folder" in text_of(page, "status")
    model_box.fill(str(smoke_model_dir))
    click_source_pixel(page, 300, 200)
    wait_for_text(page, "matches", "source: (300, 200)")
    assert "target 1: (" in text_of(page, "matches")
