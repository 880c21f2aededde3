"""AP-10K loader in the pair format of GeoAware-SC ("Telling Left from Right", Zhang et al. 2024).

Layout (built by GeoAware-SC's `data/prepare_ap10k.sh` / `prepare_ap10k.ipynb` from AP-10K)::

    ap-10k/JPEGImages/<family>/<species>/<image id>.jpg
    ap-10k/ImageAnnotation/<family>/<species>/<image id>.json
    ap-10k/PairAnnotation/<split>[_cross_species|_cross_family]/<src id>-<trg id>:<category>.json

A pair file holds only `src_json_path` and `trg_json_path` (paths ending in
`ImageAnnotation/<family>/<species>/<id>.json`, resolved against the root). An image file is a
COCO annotation: `keypoints` (17 x (x, y, v), v in {0, 2}), `bbox` [x, y, w, h], `width`,
`height`. Only keypoints visible in both images are used. Categories: species (intra-species),
families with more than one species (cross-species), `all` (cross-family).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ditf.errors import DatasetError, InvalidArgumentError
from ditf.matching.points import check_points_inside
from ditf.eval.keypoints import (
    CorrespondenceDataset,
    ImageRecord,
    KeypointPair,
    image_size,
    require_paths,
)

AP10K_SUBSETS = {"intra-species": "", "cross-species": "_cross_species", "cross-family": "_cross_family"}
AP10K_SPLITS = ("trn", "val", "test")
AP10K_ALPHAS = (0.1, 0.05, 0.01)
AP10K_KEYPOINTS = (
    "left eye", "right eye", "nose", "neck", "root of tail", "left shoulder", "left elbow", "left front paw",
    "right shoulder", "right elbow", "right front paw", "left hip", "left knee", "left back paw", "right hip",
    "right knee", "right back paw",
)
AP10K_HOW_TO_GET = (
    "Build the benchmark with GeoAware-SC's data/prepare_ap10k.sh (or prepare_ap10k.ipynb) from AP-10K "
    "(github.com/AlexTheBad/AP-10K) and pass the resulting ap-10k folder as --root"
)
_IMAGE_FIELDS = ("keypoints", "bbox", "width", "height")


def load_ap10k(
    root: str | Path,
    subset: str = "intra-species",
    split: str = "test",
    categories: list[str] | None = None,
    check_images: bool = True,
) -> CorrespondenceDataset:
    """Load the AP-10K pairs of `subset` ("intra-species", "cross-species", "cross-family") and
    `split` ("trn" for intra-species only, "val", "test").

    `categories` keeps only those pair categories (species, families or "all"). With
    `check_images` every image must exist with its annotated size. DatasetError names what is
    missing or malformed.
    """
    root = Path(root)
    if subset not in AP10K_SUBSETS:
        raise InvalidArgumentError(f"AP-10K subset must be one of {list(AP10K_SUBSETS)}, got {subset!r}")
    if split not in AP10K_SPLITS or (split == "trn" and subset != "intra-species"):
        raise InvalidArgumentError(
            f"AP-10K split must be one of {AP10K_SPLITS} (trn exists for intra-species only), got {split!r} for {subset}"
        )
    pair_folder = f"PairAnnotation/{split}{AP10K_SUBSETS[subset]}"
    require_paths("AP-10K", root, ["JPEGImages", "ImageAnnotation", pair_folder], AP10K_HOW_TO_GET)
    pair_files = sorted((root / pair_folder).glob("*.json"))
    if not pair_files:
        raise DatasetError(f"{root / pair_folder} holds no pair files (*.json). {AP10K_HOW_TO_GET}")
    available = sorted({_category_from_name(path) for path in pair_files})
    if categories is not None:
        unknown = sorted(set(categories) - set(available))
        if unknown:
            raise InvalidArgumentError(f"categories {unknown} have no {subset} {split} pairs; available: {available}")

    images: dict[Path, tuple[ImageRecord, dict]] = {}
    pairs = [
        _read_pair(root, path, images, check_images)
        for path in pair_files
        if categories is None or _category_from_name(path) in categories
    ]
    return CorrespondenceDataset(
        name="ap-10k",
        root=root,
        split=split,
        pairs=pairs,
        categories=sorted({pair.category for pair in pairs}),
        alphas=AP10K_ALPHAS,
        default_threshold="bbox",
        subset=subset,
    )


def _category_from_name(path: Path) -> str:
    name, sep, category = path.stem.rpartition(":")
    if not sep or not name:
        raise DatasetError(f"pair file {path} is not named <src id>-<trg id>:<category>.json as GeoAware-SC names them")
    return category


def _read_pair(root: Path, path: Path, images: dict[Path, tuple[ImageRecord, dict]], check: bool) -> KeypointPair:
    data = _read_json(path)
    missing = [key for key in ("src_json_path", "trg_json_path") if key not in data]
    if missing:
        raise DatasetError(f"pair file {path} lacks {missing}; it is not a GeoAware-SC AP-10K pair")
    source, source_annotation = _image(root, data["src_json_path"], images, check, path)
    target, target_annotation = _image(root, data["trg_json_path"], images, check, path)
    source_points, source_visible = _keypoints(source_annotation, source, path)
    target_points, target_visible = _keypoints(target_annotation, target, path)
    mutual = source_visible & target_visible
    if not mutual.any():
        raise DatasetError(f"pair file {path} has no keypoint visible in both images; drop the pair")
    check_points_inside(source_points[mutual], source.size, f"{path.name} source keypoints", error=DatasetError)
    check_points_inside(target_points[mutual], target.size, f"{path.name} target keypoints", error=DatasetError)
    x, y, w, h = (float(v) for v in target_annotation["bbox"])
    return KeypointPair(
        name=path.stem,
        category=_category_from_name(path),
        source=source,
        target=target,
        source_points=source_points[mutual],
        target_points=target_points[mutual],
        target_bbox=(x, y, x + w, y + h),
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"annotation {path} does not exist. {AP10K_HOW_TO_GET}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"annotation {path} is not valid JSON ({err})") from err


def _image(
    root: Path, json_path: str, images: dict[Path, tuple[ImageRecord, dict]], check: bool, pair: Path
) -> tuple[ImageRecord, dict]:
    parts = Path(json_path).parts
    if "ImageAnnotation" not in parts:
        raise DatasetError(f"pair file {pair} points to {json_path!r}, which is not under an ImageAnnotation/ folder")
    relative = Path(*parts[parts.index("ImageAnnotation") + 1 :])
    annotation_path = root / "ImageAnnotation" / relative
    if annotation_path not in images:
        annotation = _read_json(annotation_path)
        missing = [key for key in _IMAGE_FIELDS if key not in annotation]
        if missing:
            raise DatasetError(f"image annotation {annotation_path} lacks fields {missing}")
        size = (int(annotation["height"]), int(annotation["width"]))
        image_path = (root / "JPEGImages" / relative).with_suffix(".jpg")
        if check:
            actual = image_size(image_path)
            if actual != size:
                raise DatasetError(
                    f"image {image_path} is {actual[1]}x{actual[0]} (W x H) but {annotation_path.name} says "
                    f"{size[1]}x{size[0]}; re-download the image or the annotation"
                )
        record = ImageRecord(path=image_path, group=relative.parent.name, size=size)
        images[annotation_path] = (record, annotation)
    return images[annotation_path]


def _keypoints(annotation: dict, image: ImageRecord, pair: Path) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(annotation["keypoints"], dtype=np.float64)
    if values.size != 3 * len(AP10K_KEYPOINTS):
        raise DatasetError(
            f"{image.path.name} (in {pair.name}) has {values.size} keypoint values; expected "
            f"{3 * len(AP10K_KEYPOINTS)} (17 x (x, y, visibility))"
        )
    values = values.reshape(-1, 3)
    return values[:, :2], values[:, 2] > 0
