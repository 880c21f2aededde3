"""Correspondence protocols: every choice of an evaluation that changes the numbers, stated in a card.

`protocol_for(dataset, name, ...)` builds the "ditf" (DiTF authors' eval_spair.py) or "geoaware"
(GeoAware-SC) protocol for a dataset, with overrides; `Protocol.card()` states each choice in plain words
for results files.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ditf.errors import InvalidArgumentError
from ditf.eval.keypoints import CorrespondenceDataset, Frame, ImageRecord

PROTOCOL_NAMES = ("ditf", "geoaware")
MATCHERS = ("upsampled", "patch")
THRESHOLDS = ("bbox", "image")
GEOAWARE_PAD_SIZE = 840


@dataclass(frozen=True)
class Protocol:
    """Every choice of a correspondence evaluation that changes the numbers.

    frame: "original" (match in original pixels) or "square_pad" (GeoAware-SC: long side resized to
    `pad_size`, zero-padded to a square; features must come from that square image).
    matcher: "upsampled" (cosine argmax over every pixel of the bilinearly upsampled map, exact) or
    "patch" (cosine argmax over feature cells, prediction at the cell centre).
    threshold: "bbox" (max side of the target box) or "image" (max side of the frame).
    rule: "<=" (error / threshold <= alpha) or "<" (error < alpha * threshold).
    """

    name: str
    frame: str
    matcher: str
    threshold: str
    rule: str
    alphas: tuple[float, ...]
    pad_size: int = GEOAWARE_PAD_SIZE

    def frame_for(self, image: ImageRecord) -> Frame:
        """The pixel frame this protocol uses for `image`."""
        if self.frame == "original":
            return Frame.identity(image.size)
        return Frame.square_pad(image.size, self.pad_size)

    def card(self) -> dict:
        """The protocol card: a plain-language statement of every choice, printed with results."""
        if self.frame == "original":
            frame = "original image pixels; feature maps are resized to the image size (H, W)"
        else:
            frame = (f"GeoAware-SC square: long side resized to {self.pad_size}, short side zero-padded evenly; "
                     "keypoints x * s + offset (offset = int((side - round(side * short / long)) / 2)); "
                     "features must be extracted from the padded square image")
        if self.matcher == "upsampled":
            matcher = ("bilinear upsampling (align_corners=False) of both maps to the frame, computed exactly "
                       "from the low-resolution maps; source vector at the integer (floor) keypoint; cosine "
                       "argmax over every target pixel (float32-rounded, ties to the first pixel in row-major order)")
        else:
            matcher = ("cosine argmax over target feature cells; source cell floor(x * w / W); prediction at "
                       "cell * stride + floor(stride / 2) (GeoAware-SC hard argmax, no soft-argmax, no flips)")
        threshold = ("alpha * max(target bbox width, height), scaled into the frame" if self.threshold == "bbox"
                     else "alpha * max(frame height, width)")
        comparison = "error / threshold <= alpha" if self.rule == "<=" else "error < alpha * threshold"
        reference = {
            "ditf": "DiTF eval_spair.py (ganchaofan0000/DiTF @08658e6)",
            "geoaware": "GeoAware-SC pck_train.py zero-shot hard argmax (Junyi42/GeoAware-SC @99fd6b6)",
        }.get(self.name, "custom")
        card = {
            "name": self.name,
            "reference": reference,
            "frame": self.frame,
            "matcher": self.matcher,
            "threshold": self.threshold,
            "rule": self.rule,
            "alphas": list(self.alphas),
        }
        if self.frame == "square_pad":
            card["pad_size"] = self.pad_size
        card["description"] = {
            "frame": frame,
            "matcher": matcher,
            "threshold": threshold,
            "comparison": comparison,
            "error": "Euclidean distance in frame pixels between predicted and annotated target keypoint",
            "averaging": ("per_image = mean over pairs of each pair's fraction of correct keypoints; per_point = "
                          "correct / all keypoints; all_* pooled over every pair; mean_* = unweighted mean of "
                          "the per-category scores; percent"),
            "pairs": "every pair of the split (no subsampling); keypoints as annotated for the pair",
        }
        return card


def protocol_for(
    dataset: CorrespondenceDataset,
    name: str = "ditf",
    threshold: str | None = None,
    matcher: str | None = None,
    pad_size: int | None = None,
    alphas: tuple[float, ...] | None = None,
) -> Protocol:
    """The preset `name` ("ditf" or "geoaware") for `dataset`, with optional overrides.

    ditf: original frame, exact upsampled argmax, "<=". geoaware: square-pad frame (840), patch
    argmax, "<". Threshold and alphas default to the dataset's convention (bbox and 0.1/0.05/0.01
    for SPair and AP-10K; image and 0.1/0.05/0.15 for PF-Pascal).
    """
    if name == "ditf":
        protocol = Protocol(name, "original", "upsampled", dataset.default_threshold, "<=", dataset.alphas)
    elif name == "geoaware":
        protocol = Protocol(name, "square_pad", "patch", dataset.default_threshold, "<", dataset.alphas)
    else:
        raise InvalidArgumentError(f"protocol must be one of {PROTOCOL_NAMES}, got {name!r}")
    if threshold is not None and threshold not in THRESHOLDS:
        raise InvalidArgumentError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
    if matcher is not None and matcher not in MATCHERS:
        raise InvalidArgumentError(f"matcher must be one of {MATCHERS}, got {matcher!r}")
    if pad_size is not None and pad_size < 1:
        raise InvalidArgumentError(f"pad size must be a positive number of pixels, got {pad_size}")
    if alphas is not None and (not alphas or min(alphas) <= 0):
        raise InvalidArgumentError(f"alphas must be positive fractions, got {alphas}")
    return replace(
        protocol,
        threshold=threshold or protocol.threshold,
        matcher=matcher or protocol.matcher,
        pad_size=pad_size or protocol.pad_size,
        alphas=tuple(alphas) if alphas else protocol.alphas,
    )
