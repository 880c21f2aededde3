"""Pictures of dense features: PCA colourings of feature maps and their figures.

Names load on first use (PEP 562), so `import ditf.viz` imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ditf.lazy import lazy_exports

_EXPORTS = {name: "ditf.viz.pca" for name in
            ("check_threshold", "foreground_mask", "pca_rgb", "principal_components", "save_pca_figure")}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from ditf.viz.pca import check_threshold, foreground_mask, pca_rgb, principal_components, save_pca_figure


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
