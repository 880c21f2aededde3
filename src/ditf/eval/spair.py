"""SPair-71k loader (Min et al. 2019), read from the official tree.

Layout (only the first two entries are required)::

    SPair-71k/JPEGImages/<category>/<voc_id>.jpg
    SPair-71k/PairAnnotation/{trn,val,test}/<pair_id>-<src_stem>-<trg_stem>:<category>.json
    SPair-71k/Layout/{large,small}/{trn,val,test}.txt     # optional pair lists

Quirks handled: `*_imsize` is [W, H, C]; boxes are corner boxes (x1, y1, x2, y2) that may touch the
border (x2 == W); `kps_ids` are strings; pair ids restart in every split, so pairs are named by
their file name; the category comes from the file name and must agree with the `category` field.
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

SPAIR_CATEGORIES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor",
)
SPAIR_SPLITS = ("trn", "val", "test")
SPAIR_LAYOUTS = ("large", "small")
SPAIR_ALPHAS = (0.1, 0.05, 0.01)
# Per-pair integer flags and their valid values (SPair devkit statistics headers).
VARIATION_FLAGS = {
    "viewpoint_variation": (0, 1, 2),
    "scale_variation": (0, 1, 2),
    "truncation": (0, 1, 2, 3),
    "occlusion": (0, 1, 2, 3),
    "mirror": (0, 1),
}
SPAIR_HOW_TO_GET = (
    "Download https://cvlab.postech.ac.kr/research/SPair-71k/data/SPair-71k.tar.gz, extract it and pass "
    "the folder that contains JPEGImages/ and PairAnnotation/ as --root"
)
_PAIR_FIELDS = ("src_imname", "trg_imname", "src_imsize", "trg_imsize", "trg_bndbox", "category", "src_kps", "trg_kps")


def parse_filters(specs: list[str]) -> dict[str, set[int]]:
    """Parse CLI filters like `viewpoint_variation=2` or `occlusion=0,1` into {flag: {values}}."""
    filters: dict[str, set[int]] = {}
    for spec in specs:
        flag, sep, values = spec.partition("=")
        try:
            parsed = {int(value) for value in values.split(",")} if sep else set()
        except ValueError:
            parsed = set()
        if not parsed:
            raise InvalidArgumentError(
                f"filter {spec!r} must look like FLAG=VALUE[,VALUE...], e.g. viewpoint_variation=2"
            )
        filters.setdefault(flag, set()).update(parsed)
    return filters


def load_spair(
    root: str | Path,
    split: str = "test",
    categories: list[str] | None = None,
    filters: dict[str, set[int]] | None = None,
    layout: str | None = None,
    check_images: bool = True,
) -> CorrespondenceDataset:
    """Load the SPair-71k pairs of `split` ("trn", "val" or "test").

    `categories` keeps only those categories; `filters` keeps pairs whose variation flags take one
    of the given values (e.g. {"viewpoint_variation": {2}}); `layout` ("large"/"small") restricts to
    the pairs listed in `Layout/<layout>/<split>.txt`. With `check_images`, every image must exist
    and have its annotated size. Raises DatasetError naming what is missing or malformed.
    """
    root = Path(root)
    if split not in SPAIR_SPLITS:
        raise InvalidArgumentError(f"SPair-71k split must be one of {SPAIR_SPLITS}, got {split!r}")
    _check_filters(filters or {})
    require_paths("SPair-71k", root, ["JPEGImages", f"PairAnnotation/{split}"], SPAIR_HOW_TO_GET)
    pair_files = _pair_files(root, split, layout)
    available = sorted({_category_from_name(path) for path in pair_files})
    wanted = _check_categories(categories, available)

    pairs = []
    sizes: dict[Path, tuple[int, int]] = {}
    for path in pair_files:
        if _category_from_name(path) not in wanted:
            continue
        pair = _read_pair(root, path, sizes, check_images)
        if all(pair.flags.get(flag) in values for flag, values in (filters or {}).items()):
            pairs.append(pair)
    if not pairs:
        raise DatasetError(
            f"no SPair-71k pairs left in {root / 'PairAnnotation' / split} for categories {sorted(wanted)} "
            f"and filters {filters or {}}; loosen the selection"
        )
    return CorrespondenceDataset(
        name="spair-71k",
        root=root,
        split=split,
        pairs=pairs,
        categories=sorted({pair.category for pair in pairs}),
        alphas=SPAIR_ALPHAS,
        default_threshold="bbox",
        subset=f"layout={layout}" if layout else None,
    )


def _pair_files(root: Path, split: str, layout: str | None) -> list[Path]:
    folder = root / "PairAnnotation" / split
    if layout is None:
        files = sorted(folder.glob("*.json"))
        if not files:
            raise DatasetError(f"{folder} holds no pair files (*.json). {SPAIR_HOW_TO_GET}")
        return files
    if layout not in SPAIR_LAYOUTS:
        raise InvalidArgumentError(f"SPair-71k layout must be one of {SPAIR_LAYOUTS} or None, got {layout!r}")
    listing = root / "Layout" / layout / f"{split}.txt"
    if not listing.is_file():
        raise DatasetError(f"pair list {listing} is missing. {SPAIR_HOW_TO_GET}")
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    files = [folder / f"{name}.json" for name in names]
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise DatasetError(
            f"{listing} names {len(missing)} pairs without a file in {folder} (e.g. {missing[0]}). {SPAIR_HOW_TO_GET}"
        )
    return sorted(files)


def _category_from_name(path: Path) -> str:
    name, sep, category = path.stem.rpartition(":")
    if not sep or not name:
        raise DatasetError(
            f"pair file {path} is not named <pair_id>-<src>-<trg>:<category>.json as SPair-71k names them"
        )
    return category


def _check_filters(filters: dict[str, set[int]]) -> None:
    for flag, values in filters.items():
        if flag not in VARIATION_FLAGS:
            raise InvalidArgumentError(f"unknown SPair-71k filter {flag!r}; valid flags: {sorted(VARIATION_FLAGS)}")
        invalid = sorted(set(values) - set(VARIATION_FLAGS[flag]))
        if invalid:
            raise InvalidArgumentError(f"filter {flag} got values {invalid}; valid values are {VARIATION_FLAGS[flag]}")


def _check_categories(categories: list[str] | None, available: list[str]) -> set[str]:
    if categories is None:
        return set(available)
    unknown = sorted(set(categories) - set(available))
    if unknown:
        raise InvalidArgumentError(f"categories {unknown} have no pairs in this split; available: {available}")
    return set(categories)


def _read_pair(root: Path, path: Path, sizes: dict[Path, tuple[int, int]], check_images: bool) -> KeypointPair:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"pair file {path} is not valid JSON ({err}); re-download the annotations") from err
    missing = [key for key in _PAIR_FIELDS if key not in data]
    if missing:
        raise DatasetError(f"pair file {path} lacks fields {missing}; it is not an SPair-71k pair annotation")
    category = _category_from_name(path)
    if data["category"] != category:
        raise DatasetError(f"pair file {path} is named for category {category!r} but its 'category' is {data['category']!r}")

    source = _image(root, category, data["src_imname"], data["src_imsize"], sizes, check_images, path)
    target = _image(root, category, data["trg_imname"], data["trg_imsize"], sizes, check_images, path)
    source_points = np.asarray(data["src_kps"], dtype=np.float64).reshape(-1, 2)
    target_points = np.asarray(data["trg_kps"], dtype=np.float64).reshape(-1, 2)
    if source_points.shape != target_points.shape or source_points.shape[0] == 0:
        raise DatasetError(
            f"pair file {path} has {len(data['src_kps'])} source and {len(data['trg_kps'])} target keypoints; "
            "a pair needs the same positive number of each"
        )
    check_points_inside(source_points, source.size, f"{path.name} src_kps", error=DatasetError)
    check_points_inside(target_points, target.size, f"{path.name} trg_kps", error=DatasetError)
    bbox = data["trg_bndbox"]
    if len(bbox) != 4 or bbox[2] <= bbox[0] or bbox[3] <= bbox[1]:
        raise DatasetError(f"pair file {path} has trg_bndbox {bbox}; expected corners [x1, y1, x2, y2] with x2 > x1, y2 > y1")
    return KeypointPair(
        name=path.stem,
        category=category,
        source=source,
        target=target,
        source_points=source_points,
        target_points=target_points,
        target_bbox=tuple(float(v) for v in bbox),
        flags={flag: int(data[flag]) for flag in VARIATION_FLAGS if flag in data},
    )


def _image(
    root: Path, category: str, name: str, imsize: list[int], sizes: dict[Path, tuple[int, int]], check: bool, pair: Path
) -> ImageRecord:
    path = root / "JPEGImages" / category / name
    annotated = (int(imsize[1]), int(imsize[0]))  # [W, H, C] -> (H, W)
    if check:
        if path not in sizes:
            sizes[path] = image_size(path)
        if sizes[path] != annotated:
            actual_h, actual_w = sizes[path]
            raise DatasetError(
                f"image {path} is {actual_w}x{actual_h} (W x H) but {pair.name} annotates it as "
                f"{annotated[1]}x{annotated[0]}; re-download the image or the annotation"
            )
    return ImageRecord(path=path, group=category, size=annotated)
