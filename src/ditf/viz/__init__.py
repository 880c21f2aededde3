"""Pictures of dense features: PCA colourings of feature maps and their figures."""

from ditf.viz.pca import foreground_mask, pca_rgb, principal_components, save_pca_figure

__all__ = ["foreground_mask", "pca_rgb", "principal_components", "save_pca_figure"]
