"""Pictures of dense features: PCA colourings of feature maps and their figures.

Names load on first use (PEP 562), so `import ditf.viz` imports no torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {name: "ditf.viz.pca" for name in
            ("check_threshold", "foreground_mask", "pca_rgb", "principal_components", "save_pca_figure")}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from ditf.viz.pca import check_threshold, foreground_mask, pca_rgb, principal_components, save_pca_figure


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ditf.viz' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
