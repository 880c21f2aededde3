"""DAVIS-2017 semi-supervised video object segmentation: loader, label propagation run, J&F scorer.

Dataset layout (DAVIS-2017-trainval-480p.zip from https://davischallenge.org/davis2017/code.html):

    DAVIS/
      ImageSets/2017/val.txt               one sequence name per line
      JPEGImages/480p/<seq>/00000.jpg ...  frames
      Annotations/480p/<seq>/00000.png ... indexed ("P") PNGs: 0 background, 1..N objects, 255 void

A results folder holds `<seq>/<frame>.png` indexed PNGs of the original frame size, one per frame.
`score_davis` reproduces the official davis2017-evaluation (semi-supervised task): the first and last
frame of every sequence are not scored, J and F are computed per object and frame, summarised per
object as Mean, Recall and Decay, and averaged over objects (not sequences).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ditf.errors import DatasetError, ImageError, InvalidArgumentError
from ditf.io import atomic_path, write_json_atomic
from ditf.eval.davis_metrics import (
    OFFICIAL_BOUNDARY_THRESHOLD,
    boundary_f_measures,
    region_similarity,
    sequence_statistics,
)
from ditf.registry import TASK_DEFAULTS
from ditf.versions import ditf_version
from ditf.matching.propagation import DITF_DAVIS_PROPAGATION, PropagationSettings, propagate_labels

DAVIS_DOWNLOAD_HINT = (
    "download DAVIS-2017-trainval-480p.zip from https://davischallenge.org/davis2017/code.html and pass "
    "the extracted DAVIS folder (the one containing JPEGImages/, Annotations/ and ImageSets/)"
)
DAVIS_SPLITS = ("train", "val", "test-dev", "test-challenge")
VOID_LABEL = 255
GLOBAL_METRICS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")

DITF_DAVIS_SHORT_SIDE: int = TASK_DEFAULTS["davis"].protocol["short_side"]
"""DiTF's DAVIS frame size: short side 960 px (README; 960/16 = 60 cells, like DIFT's 480/8)."""
DITF_DAVIS_SIZE_MULTIPLE: int = TASK_DEFAULTS["davis"].protocol["size_multiple"]
"""The long side is floored to a multiple of 32 (DIFT/DiTF `read_frame`)."""

ExtractFn = Callable[[Path, tuple[int, int]], torch.Tensor]
"""extract_fn(image_path, (height, width)) -> (C, h, w) features of the frame resized to (height, width)."""


@dataclass(frozen=True)
class DavisSequence:
    """One DAVIS video: sorted frame JPEGs and annotation PNGs (frame files share their stems)."""

    name: str
    frames: tuple[Path, ...]
    annotations: tuple[Path, ...]


# ----------------------------------------------------------------------------------------- loader


def davis_sequence_names(root: str | Path, split: str = "val") -> list[str]:
    """Sequence names of a split, in the order of `ImageSets/2017/<split>.txt`."""
    root = _check_root(root)
    if split not in DAVIS_SPLITS:
        raise InvalidArgumentError(f"split={split!r} is not a DAVIS-2017 split; choose one of {DAVIS_SPLITS}.")
    listing = root / "ImageSets" / "2017" / f"{split}.txt"
    if not listing.is_file():
        raise DatasetError(f"DAVIS split list {listing} is missing; {DAVIS_DOWNLOAD_HINT}.")
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"DAVIS split list {listing} is empty; restore it from the DAVIS download.")
    return names


def load_davis(
    root: str | Path,
    split: str = "val",
    sequences: Sequence[str] | None = None,
    *,
    require_frames: bool = True,
) -> list[DavisSequence]:
    """Check a DAVIS-2017 tree and list the sequences of a split (480p, semi-supervised annotations).

    Args:
        root: the DAVIS folder.
        split: "val" (default), "train", "test-dev" or "test-challenge".
        sequences: a subset of the split's sequence names (default: all, in list order).
        require_frames: also require `JPEGImages/480p/<seq>/*.jpg` (scoring needs only annotations).

    Returns:
        One `DavisSequence` per requested sequence; `frames` is empty when not required and absent.
    """
    root = _check_root(root)
    names = davis_sequence_names(root, split)
    if sequences is not None:
        unknown = [name for name in sequences if name not in names]
        if unknown:
            raise InvalidArgumentError(
                f"sequences {unknown} are not in the DAVIS-2017 {split} list; valid names include "
                f"{names[:5]}{' ...' if len(names) > 5 else ''} (see ImageSets/2017/{split}.txt)."
            )
        names = list(sequences)
    annotation_root = root / "Annotations" / "480p"
    frame_root = root / "JPEGImages" / "480p"
    for folder in [annotation_root] + ([frame_root] if require_frames else []):
        if not folder.is_dir():
            raise DatasetError(f"DAVIS folder {folder} is missing; {DAVIS_DOWNLOAD_HINT}.")
    loaded = []
    for name in names:
        annotations = _sorted_files(annotation_root / name, "*.png", f"annotations of sequence {name!r}")
        frames = ()
        if require_frames or (frame_root / name).is_dir():
            frames = _sorted_files(frame_root / name, "*.jpg", f"frames of sequence {name!r}")
        loaded.append(DavisSequence(name=name, frames=frames, annotations=annotations))
    return loaded


def _check_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"DAVIS root {root} does not exist or is not a folder; {DAVIS_DOWNLOAD_HINT}.")
    return root


def _sorted_files(folder: Path, pattern: str, what: str) -> tuple[Path, ...]:
    if not folder.is_dir():
        raise DatasetError(f"the {what} are missing: folder {folder} does not exist; {DAVIS_DOWNLOAD_HINT}.")
    files = tuple(sorted(folder.glob(pattern)))
    if not files:
        raise DatasetError(f"the {what} are missing: {folder} has no {pattern} files; {DAVIS_DOWNLOAD_HINT}.")
    return files


# ------------------------------------------------------------------------------------ PNG input/output


def davis_palette() -> np.ndarray:
    """(256, 3) uint8 PASCAL VOC colour map, the palette the DAVIS toolkit writes (index 1 = (128, 0, 0))."""
    index = np.arange(256)
    palette = np.zeros((256, 3), dtype=np.int64)
    for bit_level in range(8):
        for channel in range(3):
            bit = (index >> (3 * bit_level + channel)) & 1
            palette[:, channel] |= bit << (7 - bit_level)
    return palette.astype(np.uint8)


def read_label_png(path: str | Path) -> np.ndarray:
    """Read an indexed (mode "P") or greyscale (mode "L") PNG as an (H, W) uint8 label map."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"label PNG {path} does not exist.")
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise ImageError(
                f"{path} is a mode {image.mode!r} image; DAVIS label maps must be indexed PNGs (mode 'P', "
                "pixel value = object id). Save the id array with a palette, e.g. ditf.eval.davis.write_label_png."
            )
        return np.array(image, dtype=np.uint8)


def write_label_png(path: str | Path, labels: np.ndarray) -> None:
    """Write an (H, W) label map (values 0..255) as an indexed PNG with the DAVIS palette, atomically."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise InvalidArgumentError(f"labels for {path} must be a 2-D array of ids 0..255; got shape {labels.shape}.")
    image = Image.fromarray(labels.astype(np.uint8))
    image.putpalette(davis_palette().ravel().tolist())  # turns the "L" image into "P", keeping the ids
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")


# ----------------------------------------------------------------------------------------- scoring


def score_davis(
    root: str | Path,
    results_dir: str | Path,
    split: str = "val",
    *,
    sequences: Sequence[str] | None = None,
    output: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """J&F of a results folder, as the official davis2017-evaluation semi-supervised task reports it.

    Args:
        root: the DAVIS folder (only `ImageSets/` and `Annotations/480p/` are read).
        results_dir: folder with `<seq>/<frame>.png` indexed PNGs at the annotation size.
        split: the split whose sequences are scored ("val" by default).
        sequences: score only these sequences (default: the whole split).
        output: if given, the scores are also written there as JSON (atomically).
        progress: show a tqdm bar over sequences.

    Returns:
        {"global": {J&F-Mean, J-Mean, J-Recall, J-Decay, F-Mean, F-Recall, F-Decay},
         "per_object": {"<seq>_<id>": {J-Mean, J-Recall, J-Decay, F-Mean, F-Recall, F-Decay}},
         "protocol": {...}, "ditf_version": str}; all values are fractions in [0, 1] (decay may be < 0).
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise DatasetError(f"results folder {results_dir} does not exist; pass the folder holding <seq>/<frame>.png.")
    loaded = load_davis(root, split, sequences, require_frames=False)
    _check_results_complete(loaded, results_dir)
    per_object: dict[str, dict[str, float]] = {}
    for sequence in tqdm(loaded, desc="DAVIS J&F", disable=not progress):
        per_object.update(score_sequence(sequence, results_dir))
    if not per_object:
        raise DatasetError(f"no objects to score: the first annotations of {sequences or split} contain no object ids.")
    means = {key: float(np.mean([scores[key] for scores in per_object.values()])) for key in GLOBAL_METRICS[1:]}
    scores = {
        "global": {"J&F-Mean": (means["J-Mean"] + means["F-Mean"]) / 2, **means},
        "per_object": per_object,
        "protocol": {
            "benchmark": "DAVIS-2017",
            "task": "semi-supervised",
            "split": split,
            "sequences": [sequence.name for sequence in loaded],
            "scored_frames": "all but the first and last frame of each sequence",
            "J": "region IoU (1 when both masks are empty)",
            "F": f"boundary F-measure, tolerance ceil({OFFICIAL_BOUNDARY_THRESHOLD} * image diagonal) px, disk",
            "averaging": "Mean/Recall(>0.5)/Decay(first - last quarter) per object, then mean over objects",
            "reference": "davisvideochallenge/davis2017-evaluation (semi-supervised)",
        },
        "ditf_version": ditf_version(),
    }
    if output is not None:
        write_json_atomic(output, scores)
    return scores


def score_sequence(sequence: DavisSequence, results_dir: Path) -> dict[str, dict[str, float]]:
    """Per-object J and F statistics of one sequence; keys are "<seq>_<object id>"."""
    _check_results_complete([sequence], results_dir)
    ground_truth = np.stack([read_label_png(path) for path in sequence.annotations])  # (T, H, W)
    ground_truth[ground_truth == VOID_LABEL] = 0
    n_objects = int(ground_truth[0].max())
    scored = sequence.annotations[1:-1]
    predictions = _read_results(results_dir / sequence.name, [path.stem for path in scored], ground_truth.shape[1:])
    if predictions.size and int(predictions.max()) > n_objects:
        raise DatasetError(
            f"results for sequence {sequence.name!r} contain object id {int(predictions.max())}, but its first "
            f"annotation has {n_objects} object(s); ids must match the first frame's ids (1..{n_objects})."
        )
    gt_scored = ground_truth[1:-1]
    per_object = {}
    for object_id in range(1, n_objects + 1):
        gt_masks, pred_masks = gt_scored == object_id, predictions == object_id
        j_mean, j_recall, j_decay = sequence_statistics(region_similarity(gt_masks, pred_masks))
        f_mean, f_recall, f_decay = sequence_statistics(boundary_f_measures(gt_masks, pred_masks))
        per_object[f"{sequence.name}_{object_id}"] = {
            "J-Mean": j_mean, "J-Recall": j_recall, "J-Decay": j_decay,
            "F-Mean": f_mean, "F-Recall": f_recall, "F-Decay": f_decay,
        }  # fmt: skip
    return per_object


def _check_results_complete(sequences: list[DavisSequence], results_dir: Path) -> None:
    """Fail before any scoring if a sequence folder or a scored frame's PNG is missing."""
    for sequence in sequences:
        folder = results_dir / sequence.name
        if not folder.is_dir():
            raise DatasetError(
                f"results folder {results_dir} has no sub-folder for sequence {sequence.name!r} (expected "
                f"{folder}); write <results>/<seq>/<frame>.png for every sequence scored, or pass "
                "sequences=[...] (CLI: --sequences) to score a subset."
            )
        stems = [path.stem for path in sequence.annotations[1:-1]]
        missing = [f"{stem}.png" for stem in stems if not (folder / f"{stem}.png").is_file()]
        if missing:
            raise DatasetError(
                f"{folder} lacks {len(missing)} of the {len(stems)} scored frames ({', '.join(missing[:5])}"
                f"{', ...' if len(missing) > 5 else ''}); every frame but the first and last must have a PNG "
                "named like its annotation."
            )


def _read_results(folder: Path, stems: list[str], size: tuple[int, int]) -> np.ndarray:
    """(T, H, W) uint8 predicted ids of the scored frames of one sequence, each checked to be (H, W)."""
    masks = np.zeros((len(stems), *size), dtype=np.uint8)
    for index, stem in enumerate(stems):
        mask = read_label_png(folder / f"{stem}.png")
        if mask.shape != tuple(size):
            raise DatasetError(
                f"{folder / f'{stem}.png'} is {mask.shape[1]}x{mask.shape[0]} (WxH) but the annotation is "
                f"{size[1]}x{size[0]}; save results at the original frame size (nearest-neighbour resize)."
            )
        masks[index] = mask
    return masks


# -------------------------------------------------------------------------------------- propagation


def davis_frame_size(
    height: int, width: int, short_side: int = DITF_DAVIS_SHORT_SIDE, multiple: int = DITF_DAVIS_SIZE_MULTIPLE
) -> tuple[int, int]:
    """Frame size (H, W) in pixels for feature extraction, as DiTF/DIFT resize DAVIS frames.

    The short side becomes exactly `short_side`; the long side is scaled by the same factor and
    floored to a multiple of `multiple` (854x480 -> 1696x960 with the defaults).
    """
    if short_side < 1 or multiple < 1:
        raise InvalidArgumentError(f"short_side={short_side} and multiple={multiple} must both be >= 1.")
    if height > width:
        return int((short_side * height / width) // multiple * multiple), short_side
    return short_side, int((short_side * width / height) // multiple * multiple)


def run_davis(
    root: str | Path,
    extract_fn: ExtractFn,
    output_dir: str | Path,
    *,
    split: str = "val",
    sequences: Sequence[str] | None = None,
    short_side: int = DITF_DAVIS_SHORT_SIDE,
    size_multiple: int = DITF_DAVIS_SIZE_MULTIPLE,
    settings: PropagationSettings = DITF_DAVIS_PROPAGATION,
    feature_record: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, str]:
    """Propagate every sequence's first-frame annotation and write DAVIS results PNGs.

    For each sequence, frames are resized to `davis_frame_size(H, W, short_side, size_multiple)`
    by `extract_fn`, labels are propagated with `propagate_labels(settings)` and written to
    `output_dir/<seq>/<frame>.png` (indexed, DAVIS palette, original size, atomically); frame 0 is
    the annotation itself. A sequence whose PNGs all exist is skipped, so a killed run resumes.
    The run's settings are recorded in `output_dir/davis_run.json`; resuming into a folder recorded
    with other settings is refused, so results of different runs never mix.

    Args:
        root: the DAVIS folder.
        extract_fn: `extract_fn(image_path, (height, width)) -> (C, h, w)` features of the frame
            resized to (height, width) pixels; (height, width) must be a whole multiple of (h, w).
        output_dir: the results folder to fill.
        split, sequences: which sequences to run (default: all of val).
        short_side, size_multiple: the frame-size rule (DiTF: 960 and 32).
        settings: propagation hyper-parameters (DiTF: 7 previous frames, radius 12, top-5, 0.1).
        feature_record: JSON-serialisable description of the features (model, block, t, ...),
            stored in the run record.
        progress: show tqdm bars over sequences and frames.

    Returns:
        {sequence: "propagated" | "skipped"}.
    """
    output_dir = Path(output_dir)
    loaded = load_davis(root, split, sequences)
    record = {
        "features": feature_record or {},
        "short_side": short_side,
        "size_multiple": size_multiple,
        "propagation": asdict(settings),
    }
    _claim_output(output_dir, record)
    status: dict[str, str] = {}
    for sequence in tqdm(loaded, desc="DAVIS sequences", disable=not progress):
        targets = [output_dir / sequence.name / f"{frame.stem}.png" for frame in sequence.frames]
        if all(target.is_file() for target in targets):
            status[sequence.name] = "skipped"
            continue
        first_mask = _first_annotation(sequence)
        frame_size = davis_frame_size(*first_mask.shape, short_side, size_multiple)
        frames = tqdm(sequence.frames, desc=sequence.name, leave=False, disable=not progress)
        features = _extract_all(frames, extract_fn, frame_size)
        first_features = next(features)
        stride = _stride(first_features, frame_size, sequence.frames[0])
        write_label_png(targets[0], first_mask)
        labels = propagate_labels(chain([first_features], features), first_mask, stride=stride, settings=settings)
        for target, label_map in zip(targets[1:], labels, strict=True):
            write_label_png(target, label_map)
        status[sequence.name] = "propagated"
    return status


RUN_RECORD = "davis_run.json"


def _claim_output(output_dir: Path, record: dict[str, Any]) -> None:
    """Write the run record, or check that an existing one matches (JSON round trip on both sides)."""
    path = output_dir / RUN_RECORD
    wanted = json.loads(json.dumps(record))
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != wanted:
            raise InvalidArgumentError(
                f"{output_dir} holds DAVIS results of another run ({path}: {existing}); this run uses {wanted}. "
                "Pick a new output folder, or delete that one to recompute."
            )
        return
    write_json_atomic(path, wanted)


def _first_annotation(sequence: DavisSequence) -> np.ndarray:
    """(H, W) uint8 ids of the first frame's annotation, void (255) set to background."""
    first_frame = sequence.frames[0]
    path = next((p for p in sequence.annotations if p.stem == first_frame.stem), None)
    if path is None:
        raise DatasetError(
            f"sequence {sequence.name!r} has no annotation for its first frame {first_frame.name} (expected "
            f"{first_frame.stem}.png next to {sequence.annotations[0]}); {DAVIS_DOWNLOAD_HINT}."
        )
    mask = read_label_png(path)
    with Image.open(first_frame) as image:
        width, height = image.size
    if mask.shape != (height, width):
        raise DatasetError(
            f"annotation {path} is {mask.shape[1]}x{mask.shape[0]} but frame {first_frame} is {width}x{height}; "
            "use the 480p frames and annotations from the same DAVIS download."
        )
    mask[mask == VOID_LABEL] = 0
    return mask


def _extract_all(frames: Iterator[Path], extract_fn: ExtractFn, size: tuple[int, int]) -> Iterator[torch.Tensor]:
    for frame in frames:
        with torch.no_grad():
            features = extract_fn(frame, size)
        yield features


def _stride(features: torch.Tensor, frame_size: tuple[int, int], frame: Path) -> int:
    """Pixels per feature cell, checked to be the same whole number along both axes."""
    if not isinstance(features, torch.Tensor) or features.ndim != 3:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise InvalidArgumentError(f"extract_fn must return a (C, h, w) tensor for {frame}; got {shape}.")
    (height, width), (h, w) = frame_size, features.shape[1:]
    if height % h or width % w or height // h != width // w:
        raise InvalidArgumentError(
            f"extract_fn returned a {h}x{w} grid for {frame} resized to {height}x{width}; the frame size must be "
            "the same whole multiple of the grid along both axes (the feature stride, 16 for FLUX)."
        )
    return height // h


# -------------------------------------------------------------------------------------------- plots


def plot_davis_scores(scores: dict[str, Any], path: str | Path) -> Path:
    """Bar chart of per-object J-Mean and F-Mean with the global J&F-Mean as a line; saved atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(scores["per_object"])
    positions = np.arange(len(names))
    figure = Figure(figsize=(max(6.0, 0.35 * len(names) + 2), 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.bar(positions - 0.2, [scores["per_object"][n]["J-Mean"] for n in names], 0.4, label="J-Mean")
    axes.bar(positions + 0.2, [scores["per_object"][n]["F-Mean"] for n in names], 0.4, label="F-Mean")
    axes.axhline(scores["global"]["J&F-Mean"], color="black", linestyle="--", label="J&F-Mean (all objects)")
    axes.set_xticks(positions, names, rotation=90)
    axes.set_ylim(0, 1)
    axes.set_ylabel("score")
    axes.set_title(f"DAVIS-2017 J&F-Mean {scores['global']['J&F-Mean']:.3f}")
    axes.legend(loc="lower right")
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format=path.suffix.lstrip(".") or "png")
    return path
