"""`ditf app`: an interactive page to click a point on a source image and see its matches in target images.

The library parts are plain Python (`store`: model loading and the one store of features; `callbacks`: what each
event computes; `render`, `massive_profile`: pictures), so tests and benchmarks call them directly; only
`ui.build_app` needs gradio (`pip install 'ditf[app]'`), imported when it is called. Names load on first use
(PEP 562): `import ditf.app` imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ditf.lazy import lazy_exports

_EXPORTS = {
    "FeatureStore": "ditf.app.store",
    "ModelLoader": "ditf.app.store",
    "ClickView": "ditf.app.callbacks",
    "PcaView": "ditf.app.callbacks",
    "MassiveView": "ditf.app.callbacks",
    "click": "ditf.app.callbacks",
    "pca": "ditf.app.callbacks",
    "massive": "ditf.app.callbacks",
    "build_app": "ditf.app.ui",
    "launch": "ditf.app.ui",
    "cached_smoke_model": "ditf.app.smoke_model",
    "bundled_examples": "ditf.app.examples",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from ditf.app.callbacks import ClickView, MassiveView, PcaView, click, massive, pca
    from ditf.app.examples import bundled_examples
    from ditf.app.smoke_model import cached_smoke_model
    from ditf.app.store import FeatureStore, ModelLoader
    from ditf.app.ui import build_app, launch


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
