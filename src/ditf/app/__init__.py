"""`ditf app`: an interactive page to click a point on a source image and see its matches.

The library parts are plain Python (callbacks, caches, rendering) so tests and benchmarks can call
them; only `build_app` needs gradio (`pip install ditf[app]`), imported when it is called.
"""

from ditf.app.callbacks import ClickView, MassiveView, PcaView, click, massive, pca
from ditf.app.settings import SMOKE_SETTINGS, VARIANTS, FeatureSettings
from ditf.app.store import FeatureStore, pretrained_loader

__all__ = ["ClickView", "FeatureSettings", "FeatureStore", "MassiveView", "PcaView", "SMOKE_SETTINGS", "VARIANTS",
           "click", "massive", "pca", "pretrained_loader"]
