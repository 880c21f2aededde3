"""ADE20K (MIT SceneParsing, ADEChallengeData2016): dataset loader, label maps and the 150 class names.

Layout (ADEChallengeData2016.zip from the SceneParsing benchmark, see `ADE20K_DOWNLOAD_HINT`):

    ADEChallengeData2016/
      images/training/ADE_train_00000001.jpg ...      20,210 images
      images/validation/ADE_val_00000001.jpg ...       2,000 images
      annotations/training/ADE_train_00000001.png ...  single-channel PNGs, same stems
      annotations/validation/ADE_val_00000001.png ...

Annotation pixels are class ids 1..150 (`ADE20K_CLASSES[id - 1]` names them) and 0 for "other
objects", which every standard protocol ignores. mmsegmentation's `reduce_zero_label` (see
`reduce_zero_label`) maps 0 -> 255 (ignored) and k -> k - 1, giving train ids 0..149.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from ditf.errors import DatasetError, InvalidArgumentError
from ditf.io import atomic_path

ADE20K_URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
ADE20K_DOWNLOAD_HINT = (
    f"download ADEChallengeData2016.zip ({ADE20K_URL}, the MIT SceneParsing benchmark) and pass the folder "
    "that contains the extracted ADEChallengeData2016/ (or that folder itself)"
)
ADE20K_FOLDER = "ADEChallengeData2016"
ADE20K_SPLITS = ("training", "validation")
ADE20K_NUM_CLASSES = 150
IGNORE_INDEX = 255
"""Label value that is never trained on or scored (mmsegmentation's `ignore_index`)."""

ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair",
    "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
"""Names of class ids 1..150 (index 0 is id 1), as mmsegmentation's ADE20KDataset lists them."""

LABEL_PNG_MODES = ("L", "P", "I;16", "I;16B", "I;16L", "I")
"""Single-channel PIL modes a label PNG may have (8-bit, indexed, 16-bit or 32-bit integers)."""


class Ade20kSample(NamedTuple):
    """One ADE20K image and its annotation PNG (same stem)."""

    image: Path
    annotation: Path

    @property
    def stem(self) -> str:
        """The file name without extension, e.g. "ADE_val_00000001"."""
        return self.annotation.stem


def class_name(class_id: int) -> str:
    """Name of an ADE20K class id in the annotation convention (1..150)."""
    if not 1 <= class_id <= ADE20K_NUM_CLASSES:
        raise InvalidArgumentError(
            f"class_id={class_id} is not an ADE20K class; ids run from 1 to {ADE20K_NUM_CLASSES} (0 is 'other')."
        )
    return ADE20K_CLASSES[class_id - 1]


def dataset_folder(root: str | Path) -> Path:
    """The ADEChallengeData2016 folder: `root/ADEChallengeData2016` if it exists, else `root` itself."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"ADE20K root {root} does not exist or is not a folder; {ADE20K_DOWNLOAD_HINT}.")
    nested = root / ADE20K_FOLDER
    return nested if nested.is_dir() else root


def load_ade20k(root: str | Path, split: str = "validation", *, require_images: bool = True) -> list[Ade20kSample]:
    """Check an ADE20K tree and list a split's (image, annotation) pairs, sorted by stem.

    Args:
        root: the folder holding `ADEChallengeData2016/`, or that folder itself.
        split: "validation" (default) or "training".
        require_images: also require `images/<split>/<stem>.jpg` for every annotation (scoring reads
            only annotations and passes False; `image` then points where the JPEG would be).

    Returns:
        One `Ade20kSample` per annotation PNG.

    Raises:
        DatasetError: a folder is missing or empty, or an image has no annotation (or vice versa).
    """
    if split not in ADE20K_SPLITS:
        raise InvalidArgumentError(f"split={split!r} is not an ADE20K split; choose one of {ADE20K_SPLITS}.")
    folder = dataset_folder(root)
    annotations = _listing(folder / "annotations" / split, "*.png", f"ADE20K {split} annotations")
    image_folder = folder / "images" / split
    if not require_images:
        return [Ade20kSample(image_folder / f"{path.stem}.jpg", path) for path in annotations]
    images = _listing(image_folder, "*.jpg", f"ADE20K {split} images")
    image_stems = {path.stem for path in images}
    annotation_stems = {path.stem for path in annotations}
    _check_paired(sorted(image_stems - annotation_stems), "image", folder / "annotations" / split, ".png")
    _check_paired(sorted(annotation_stems - image_stems), "annotation", image_folder, ".jpg")
    return [Ade20kSample(image_folder / f"{path.stem}.jpg", path) for path in annotations]


def _listing(folder: Path, pattern: str, what: str) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"the {what} are missing: folder {folder} does not exist; {ADE20K_DOWNLOAD_HINT}.")
    files = sorted(folder.glob(pattern))
    if not files:
        raise DatasetError(f"the {what} are missing: {folder} has no {pattern} files; {ADE20K_DOWNLOAD_HINT}.")
    return files


def _check_paired(unmatched: list[str], kind: str, partner_folder: Path, partner_suffix: str) -> None:
    if unmatched:
        shown = ", ".join(f"{stem}{partner_suffix}" for stem in unmatched[:5])
        raise DatasetError(
            f"the ADE20K tree is incomplete: {len(unmatched)} {kind}(s) have no partner in {partner_folder} "
            f"(missing {shown}{', ...' if len(unmatched) > 5 else ''}); re-extract ADEChallengeData2016.zip "
            f"({ADE20K_URL}) so that every image has an annotation with the same stem."
        )


def read_label_png(path: str | Path, what: str = "label map") -> np.ndarray:
    """Read a single-channel label PNG as an (H, W) int64 array of the stored ids.

    Raises:
        DatasetError: the file is missing, not an image, or has colour channels.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{what} {path} does not exist.")
    try:
        with Image.open(path) as image:
            if image.mode not in LABEL_PNG_MODES:
                raise DatasetError(
                    f"{what} {path} is a mode {image.mode!r} image; label maps must be single-channel PNGs "
                    "(uint8 mode 'L' or 'P', or uint16) whose pixel values are class ids, not colours."
                )
            return np.array(image).astype(np.int64)
    except (UnidentifiedImageError, OSError) as err:
        raise DatasetError(
            f"{what} {path} cannot be read as a PNG ({err}); rewrite it as a single-channel PNG."
        ) from err


def label_png_size(path: str | Path) -> tuple[int, int]:
    """(height, width) in pixels of a label PNG, read from its header only."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
        raise DatasetError(f"label map {path} cannot be read ({err}); {ADE20K_DOWNLOAD_HINT}.") from err
    return height, width


def read_annotation(path: str | Path) -> np.ndarray:
    """(H, W) int64 class ids of an ADE20K annotation, checked to be 0..150 or 255 (0 = other)."""
    labels = read_label_png(path, "ADE20K annotation")
    bad = labels[(labels > ADE20K_NUM_CLASSES) & (labels != IGNORE_INDEX)]
    if bad.size:
        raise DatasetError(
            f"ADE20K annotation {path} contains id {int(bad.max())}, but SceneParsing annotations hold ids "
            f"0..{ADE20K_NUM_CLASSES}; use the annotations of ADEChallengeData2016.zip ({ADE20K_URL}), not the "
            "full ADE20K index with its ~3,000 object classes."
        )
    return labels


def reduce_zero_label(labels: np.ndarray) -> np.ndarray:
    """mmsegmentation's `reduce_zero_label`: 0 -> 255 (ignored), k -> k - 1, 255 stays 255.

    Args:
        labels: (H, W) integer ids in the annotation convention (0 = other, 1..150 classes).

    Returns:
        (H, W) int64 train ids 0..149, with 255 wherever the input was 0 or 255.
    """
    labels = np.asarray(labels).astype(np.int64)
    reduced = labels - 1
    reduced[(labels == 0) | (labels == IGNORE_INDEX)] = IGNORE_INDEX
    return reduced


def write_label_png(path: str | Path, ids: np.ndarray) -> Path:
    """Write an (H, W) id map (0..255) as a single-channel uint8 PNG (mode "L", like the annotations), atomically."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.min(initial=0) < 0 or ids.max(initial=0) > 255:
        raise InvalidArgumentError(f"ids for {path} must be a 2-D array of values 0..255; got shape {ids.shape}.")
    path = Path(path)
    with atomic_path(path) as temporary:
        Image.fromarray(ids.astype(np.uint8)).save(temporary, format="PNG")
    return path
