"""PF-Pascal loader (Ham et al. 2016) with the weakalign pair lists used by SD-DINO and GeoAware-SC.

Layout::

    PF-dataset-PASCAL/JPEGImages/<voc_id>.jpg
    PF-dataset-PASCAL/Annotations/<class>/<voc_id>.mat     # only for --threshold bbox (field `bbox`)
    PF-dataset-PASCAL/{trn,val,test}_pairs_pf_pascal.csv

Each CSV row (an optional header first) is read by position: source image, target image, class
(1-based over the 20 VOC classes), then source x list, source y list, target x list, target y list,
each a ';'-separated float list. Image paths are relative to the root's parent
(`PF-dataset-PASCAL/JPEGImages/...`); a bare file name is looked up in `JPEGImages/`.
"""

from __future__ import annotations

import csv
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

PF_PASCAL_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
PF_PASCAL_SPLITS = ("trn", "val", "test")
PF_PASCAL_ALPHAS = (0.1, 0.05, 0.15)
PF_PASCAL_HOW_TO_GET = (
    "Download PF-dataset-PASCAL.zip from the Proposal Flow page (https://www.di.ens.fr/willow/research/proposalflow/) "
    "and the weakalign pair lists {split}_pairs_pf_pascal.csv (github.com/ignacio-rocco/weakalign, "
    "datasets/download_datasets.py) into it, and pass the PF-dataset-PASCAL folder as --root"
)


def load_pfpascal(
    root: str | Path,
    split: str = "test",
    categories: list[str] | None = None,
    with_boxes: bool = False,
) -> CorrespondenceDataset:
    """Load the PF-Pascal pairs of `split` from `<root>/<split>_pairs_pf_pascal.csv`.

    `categories` keeps only those VOC classes. `with_boxes` reads each target's object box from
    `Annotations/<class>/<stem>.mat` (needed for bbox thresholds; PF-Pascal's usual threshold is
    the image size). DatasetError names missing files and malformed rows.
    """
    root = Path(root)
    if split not in PF_PASCAL_SPLITS:
        raise InvalidArgumentError(f"PF-Pascal split must be one of {PF_PASCAL_SPLITS}, got {split!r}")
    if categories is not None:
        unknown = sorted(set(categories) - set(PF_PASCAL_CLASSES))
        if unknown:
            raise InvalidArgumentError(f"unknown PF-Pascal classes {unknown}; valid: {list(PF_PASCAL_CLASSES)}")
    csv_name = f"{split}_pairs_pf_pascal.csv"
    how_to_get = PF_PASCAL_HOW_TO_GET.format(split=split)
    require_paths("PF-Pascal", root, ["JPEGImages", csv_name] + (["Annotations"] if with_boxes else []), how_to_get)

    sizes: dict[Path, tuple[int, int]] = {}
    pairs = []
    for row_number, row in _rows(root / csv_name):
        pair = _read_row(root, csv_name, row_number, row, sizes, with_boxes)
        if categories is None or pair.category in categories:
            pairs.append(pair)
    if not pairs:
        raise DatasetError(f"no PF-Pascal pairs in {root / csv_name} for classes {categories}; check the selection")
    return CorrespondenceDataset(
        name="pf-pascal",
        root=root,
        split=split,
        pairs=pairs,
        categories=sorted({pair.category for pair in pairs}),
        alphas=PF_PASCAL_ALPHAS,
        default_threshold="image",
    )


def _rows(path: Path) -> list[tuple[int, list[str]]]:
    with open(path, newline="") as handle:
        rows = [(number, row) for number, row in enumerate(csv.reader(handle), start=1) if row]
    first = rows[0][1] if rows else []
    if len(first) < 3 or not first[2].strip().isdigit():
        rows = rows[1:]  # a header row (e.g. source_image,target_image,class,XA,YA,XB,YB)
    if not rows:
        raise DatasetError(f"{path} holds no pairs")
    return rows


def _read_row(
    root: Path, csv_name: str, number: int, row: list[str], sizes: dict[Path, tuple[int, int]], with_boxes: bool
) -> KeypointPair:
    where = f"{csv_name} row {number}"
    if len(row) < 7:
        raise DatasetError(
            f"{where} has {len(row)} columns; expected source, target, class, source x, source y, target x, "
            "target y (the weakalign test/val format with keypoints)"
        )
    class_index = int(row[2]) - 1 if row[2].strip().isdigit() else -1
    if not 0 <= class_index < len(PF_PASCAL_CLASSES):
        raise DatasetError(f"{where} has class {row[2]}; expected 1..{len(PF_PASCAL_CLASSES)} (1-based VOC class)")
    category = PF_PASCAL_CLASSES[class_index]
    source = _image(root, row[0], category, sizes, where)
    target = _image(root, row[1], category, sizes, where)
    source_points = _points(row[3], row[4], where)
    target_points = _points(row[5], row[6], where)
    if source_points.shape != target_points.shape:
        raise DatasetError(f"{where} lists {len(source_points)} source and {len(target_points)} target keypoints")
    check_points_inside(source_points, source.size, f"{where} source keypoints", error=DatasetError)
    check_points_inside(target_points, target.size, f"{where} target keypoints", error=DatasetError)
    return KeypointPair(
        name=f"{number:05d}-{source.stem}-{target.stem}:{category}",
        category=category,
        source=source,
        target=target,
        source_points=source_points,
        target_points=target_points,
        target_bbox=_box(root, category, target.stem) if with_boxes else None,
    )


def _image(root: Path, relative: str, category: str, sizes: dict[Path, tuple[int, int]], where: str) -> ImageRecord:
    candidates = [root.parent / relative, root / relative, root / "JPEGImages" / Path(relative).name]
    path = next((candidate for candidate in candidates if candidate.is_file()), None)
    if path is None:
        raise DatasetError(f"{where} names image {relative!r}, found at none of {[str(c) for c in candidates]}")
    if path not in sizes:
        sizes[path] = image_size(path)
    return ImageRecord(path=path, group=category, size=sizes[path])


def _points(xs: str, ys: str, where: str) -> np.ndarray:
    try:
        x = np.array([float(v) for v in xs.split(";") if v.strip()])
        y = np.array([float(v) for v in ys.split(";") if v.strip()])
    except ValueError as err:
        raise DatasetError(f"{where} has a keypoint list that is not ';'-separated numbers ({err})") from err
    if x.shape != y.shape or x.size == 0:
        raise DatasetError(f"{where} has {x.size} x and {y.size} y coordinates; expected equal, positive counts")
    return np.stack([x, y], axis=1)


def _box(root: Path, category: str, stem: str) -> tuple[float, float, float, float]:
    path = root / "Annotations" / category / f"{stem}.mat"
    if not path.is_file():
        raise DatasetError(f"annotation {path} is missing; it holds the object box needed by --threshold bbox")
    try:
        import scipy.io

        box = np.asarray(scipy.io.loadmat(str(path))["bbox"], dtype=np.float64).reshape(-1)
    except (KeyError, ValueError, OSError) as err:
        raise DatasetError(f"{path} has no readable 'bbox' (x1, y1, x2, y2): {err}") from err
    if box.size != 4:
        raise DatasetError(f"{path} 'bbox' has {box.size} values; expected x1, y1, x2, y2")
    return tuple(float(v) for v in box)
