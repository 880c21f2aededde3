"""The correspondence harness: protocols, feature stages, matching, scoring and sharding.

`evaluate(dataset, source, protocol)` makes sure every image has features (extracting missing
ones when the source can), predicts every pair's target keypoints under the protocol and returns
the results dictionary (`ditf.eval.report` writes it). Protocols are explicit: `protocol_for`
builds one from a preset name ("ditf" or "geoaware") and overrides, and `Protocol.card` states
every choice that changes the numbers.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ditf.errors import DatasetError, InvalidArgumentError
from ditf.eval.keypoints import CorrespondenceDataset, Frame, ImageRecord, KeypointPair
from ditf.eval.metrics import PairOutcome, bbox_threshold, point_errors, summarize
from ditf.eval.sources import CachedExtractor, ExtractFn, FeatureSource, PromptPolicy, load_captions
from ditf.matching.correspondence import (
    UpsampledTarget,
    match_points_lowres,
    match_prepared,
    prepare_target,
    upsampled_vectors,
)

PROTOCOL_NAMES = ("ditf", "geoaware")
MATCHERS = ("upsampled", "patch")
THRESHOLDS = ("bbox", "image")
GEOAWARE_PAD_SIZE = 840
FEATURE_LRU_IMAGES = 32
VARIANTS = {
    "raw": {"normalize": False, "modulate": False, "discard": None},
    "ln": {"normalize": True, "modulate": False, "discard": None},
    "adaln": {"normalize": True, "modulate": True, "discard": None},
    "ditf": {"normalize": True, "modulate": True, "discard": "auto"},
}


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


class _FeatureStore:
    """Loads, checks and keeps the most recently used feature maps and prepared targets."""

    def __init__(self, source: FeatureSource, protocol: Protocol, capacity: int = FEATURE_LRU_IMAGES):
        self.source = source
        self.protocol = protocol
        self.capacity = capacity
        self._features: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._targets: OrderedDict[str, UpsampledTarget] = OrderedDict()

    def features(self, image: ImageRecord) -> torch.Tensor:
        if image.key not in self._features:
            features = self.source.load(image)
            if self.protocol.frame == "square_pad" and features.shape[1] != features.shape[2]:
                raise DatasetError(
                    f"features of {image.path.name} are {features.shape[1]}x{features.shape[2]} (h x w) but "
                    "--protocol geoaware needs maps of the zero-padded square image (h == w); extract them "
                    "from the padded image or use --protocol ditf"
                )
            self._remember(self._features, image.key, features)
        self._features.move_to_end(image.key)
        return self._features[image.key]

    def target(self, image: ImageRecord, frame: Frame) -> UpsampledTarget:
        if image.key not in self._targets:
            self._remember(self._targets, image.key, prepare_target(self.features(image), frame.size))
        self._targets.move_to_end(image.key)
        return self._targets[image.key]

    def _remember(self, table: OrderedDict, key: str, value: object) -> None:
        table[key] = value
        while len(table) > self.capacity:
            table.popitem(last=False)


@dataclass(frozen=True)
class PairPrediction:
    """Predicted target keypoints of one pair: `frame_points` (P, 2) in the protocol frame,
    `image_points` (P, 2) in original target pixels, `outcome` the errors and threshold."""

    frame_points: np.ndarray
    image_points: np.ndarray
    outcome: PairOutcome


def predict_pair(pair: KeypointPair, store: _FeatureStore, protocol: Protocol) -> PairPrediction:
    """Match `pair`'s source keypoints into its target under `protocol` and measure the errors."""
    src_feats = store.features(pair.source)
    trg_feats = store.features(pair.target)
    if src_feats.shape[0] != trg_feats.shape[0]:
        raise DatasetError(
            f"pair {pair.name}: source features have {src_feats.shape[0]} channels but target features have "
            f"{trg_feats.shape[0]}; extract every image with the same model and settings"
        )
    src_frame = protocol.frame_for(pair.source)
    trg_frame = protocol.frame_for(pair.target)
    src_points = src_frame.to_frame(pair.source_points)
    if protocol.matcher == "upsampled":
        pixels = _floor_inside(src_points, src_frame.size)
        vectors = upsampled_vectors(src_feats, src_frame.size, torch.from_numpy(pixels))
        predicted = match_prepared(vectors, store.target(pair.target, trg_frame)).numpy().astype(np.float64)
    else:
        predicted = _patch_predictions(src_feats, trg_feats, src_points, src_frame, trg_frame)

    if protocol.threshold == "bbox":
        if pair.target_bbox is None:
            raise DatasetError(f"pair {pair.name} has no target bounding box; use --threshold image")
        threshold = bbox_threshold(pair.target_bbox) * trg_frame.scale
    else:
        threshold = float(max(trg_frame.size))
    truth = trg_frame.to_frame(pair.target_points)
    outcome = PairOutcome(pair.name, pair.category, point_errors(predicted, truth), threshold)
    return PairPrediction(predicted, trg_frame.from_frame(predicted), outcome)


def _floor_inside(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    pixels = np.floor(points).astype(np.int64)
    pixels[:, 0] = pixels[:, 0].clip(0, width - 1)
    pixels[:, 1] = pixels[:, 1].clip(0, height - 1)
    return pixels


def _patch_predictions(
    src_feats: torch.Tensor, trg_feats: torch.Tensor, src_points: np.ndarray, src_frame: Frame, trg_frame: Frame
) -> np.ndarray:
    _, src_h, src_w = src_feats.shape
    _, trg_h, trg_w = trg_feats.shape
    cells = np.stack(
        [np.floor(src_points[:, 0] * src_w / src_frame.size[1]), np.floor(src_points[:, 1] * src_h / src_frame.size[0])],
        axis=1,
    ).astype(np.int64)
    cells[:, 0] = cells[:, 0].clip(0, src_w - 1)
    cells[:, 1] = cells[:, 1].clip(0, src_h - 1)
    target_cells = match_points_lowres(src_feats, trg_feats, torch.from_numpy(cells)).numpy()
    stride_x, stride_y = trg_frame.size[1] / trg_w, trg_frame.size[0] / trg_h
    return np.stack(
        [target_cells[:, 0] * stride_x + math.floor(stride_x / 2), target_cells[:, 1] * stride_y + math.floor(stride_y / 2)],
        axis=1,
    )


def ensure_features(images: list[ImageRecord], source: FeatureSource, progress: bool = True) -> int:
    """Make sure `source` has features for every image; extract missing ones if it can.

    Returns how many were extracted. DatasetError listing the missing count when the source cannot
    compute (a features folder, or a cache-only scoring step after sharded extraction).
    """
    missing = [image for image in tqdm(images, desc="checking features", disable=not progress, leave=False)
               if not source.available(image)]
    if missing and not source.can_compute:
        examples = ", ".join(image.key for image in missing[:3])
        raise DatasetError(f"{len(missing)} of {len(images)} images have no features (e.g. {examples}); {source.missing_hint}")
    for image in tqdm(missing, desc="extracting features", disable=not progress):
        source.load(image)
    check_channels(images, source)
    return len(missing)


def check_channels(images: list[ImageRecord], source: FeatureSource) -> None:
    """DatasetError unless every image's map (checked from its header) has the same channel count."""
    first: tuple[ImageRecord, int] | None = None
    for image in images:
        channels = source.inspect(image)[0]
        if first is None:
            first = (image, channels)
        elif channels != first[1]:
            raise DatasetError(
                f"features of {image.key} have {channels} channels but those of {first[0].key} have {first[1]}; "
                "extract every image with the same model and settings"
            )


def evaluate(
    dataset: CorrespondenceDataset,
    source: FeatureSource,
    protocol: Protocol,
    settings: dict | None = None,
    progress: bool = True,
) -> dict:
    """Score `dataset` with features from `source` under `protocol`.

    Returns the results dictionary: `per_category` {category: {per_image, per_point, pairs,
    points}}, `all_per_image`, `all_per_point`, `mean_per_image`, `mean_per_point` (percent, at
    the protocol's first alpha), `by_alpha` (the other alphas), `protocol` (the card), `settings`,
    `benchmark`, `ditf_version` and `pairs` {pair name: {category, pred_trg_kps (original target
    pixels), correct, total}}.
    """
    ensure_features(dataset.images(), source, progress)
    store = _FeatureStore(source, protocol)
    predictions: dict[str, PairPrediction] = {}
    for pair in tqdm(dataset.pairs, desc="matching", disable=not progress):
        predictions[pair.name] = predict_pair(pair, store, protocol)

    outcomes = [prediction.outcome for prediction in predictions.values()]
    main_alpha, other_alphas = protocol.alphas[0], protocol.alphas[1:]
    results = {"benchmark": dataset.describe(), "alpha": main_alpha}
    results.update(summarize(outcomes, dataset.categories, main_alpha, protocol.rule))
    results["by_alpha"] = {str(alpha): summarize(outcomes, dataset.categories, alpha, protocol.rule)
                           for alpha in other_alphas}
    results["protocol"] = protocol.card()
    results["settings"] = dict(settings or {})
    results["ditf_version"] = ditf_version()
    integer_frame = protocol.frame == "original"
    results["pairs"] = {
        name: {
            "category": prediction.outcome.category,
            "pred_trg_kps": (prediction.image_points.astype(np.int64).tolist() if integer_frame
                             else np.round(prediction.image_points, 3).tolist()),
            "correct": int(prediction.outcome.correct(main_alpha, protocol.rule).sum()),
            "total": int(prediction.outcome.errors.shape[0]),
        }
        for name, prediction in predictions.items()
    }
    return results


def ditf_version() -> str:
    """Installed version of the ditf package."""
    try:
        return metadata.version("ditf")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def parse_shard(text: str) -> tuple[int, int]:
    """"i/n" (0 <= i < n) -> (i, n); "auto" reads RANK and WORLD_SIZE as set by `accelerate launch`
    or `torchrun` (0/1 when absent)."""
    if text == "auto":
        index, count = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    else:
        head, sep, tail = text.partition("/")
        try:
            index, count = int(head), int(tail)
        except ValueError:
            index, count = -1, 0
        if not sep:
            index, count = -1, 0
    if count < 1 or not 0 <= index < count:
        raise InvalidArgumentError(f"shard must be i/n with 0 <= i < n (e.g. 0/4), or 'auto'; got {text!r}")
    return index, count


def shard_images(images: list[ImageRecord], index: int, count: int) -> list[ImageRecord]:
    """Shard `index` of `count`: every count-th image of the key-sorted list, starting at `index`.
    Shards are disjoint, cover every image and do not depend on the process that computes them."""
    ordered = sorted(images, key=lambda image: image.key)
    return ordered[index::count]


def extract_shard(dataset: CorrespondenceDataset, extractor: CachedExtractor, shard: tuple[int, int],
                  progress: bool = True) -> dict:
    """Fill the cache for shard (i, n) of `dataset`'s images; returns counts, including how many
    images of the whole dataset still lack features."""
    index, count = shard
    mine = shard_images(dataset.images(), index, count)
    computed = ensure_features(mine, extractor, progress)
    still_missing = sum(not extractor.available(image) for image in dataset.images())
    return {"shard": f"{index}/{count}", "images": len(mine), "extracted": computed,
            "missing_in_dataset": still_missing}


def square_padded_image(path: Path, side: int, out_path: Path) -> Path:
    """Write `path` resized (LANCZOS) to long side `side` and zero-padded to side x side (GeoAware-SC's
    `resize(..., edge=False)`) as a lossless PNG at `out_path`."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        width, height = image.size
        if height <= width:
            resized = image.resize((side, int(np.around(side * height / width))), Image.Resampling.LANCZOS)
            top, left = (side - resized.size[1]) // 2, 0
        else:
            resized = image.resize((int(np.around(side * width / height)), side), Image.Resampling.LANCZOS)
            top, left = 0, (side - resized.size[0]) // 2
    canvas = Image.new("RGB", (side, side))
    canvas.paste(resized, (left, top))
    canvas.save(out_path, format="PNG")
    return out_path


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # as `ditf features` names them


def featurizer_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of `DiTFeaturizer.__call__` selected by the CLI options: the variant's
    normalize / modulate / discard, block, t, ensemble, resolution (from the model's preset when
    unset and the model is a known alias or hub id) and seed."""
    from ditf.registry import PRESETS, preset_for_hub_id

    variant = getattr(args, "variant", None) or "ditf"
    if variant not in VARIANTS:
        raise InvalidArgumentError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    preset = PRESETS.get(args.model) or preset_for_hub_id(args.model)
    kwargs = dict(VARIANTS[variant])
    for option in ("block", "t", "ensemble", "resolution"):
        value = getattr(args, option, None)
        if value is None and preset is not None:
            value = getattr(preset, option)
        if value is not None:
            kwargs[option] = float(value) if option == "t" else int(value)
    kwargs["seed"] = getattr(args, "seed", None) or 0
    return kwargs


def model_dtype(name: str | None, device: str) -> torch.dtype:
    """--dtype (fp32, bf16, fp16) or the default: bf16 on CUDA, fp32 elsewhere."""
    if name is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise InvalidArgumentError(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def default_cache_dir() -> Path:
    """$DITF_CACHE_DIR/features, or ~/.cache/ditf/features."""
    return Path(os.environ.get("DITF_CACHE_DIR", Path.home() / ".cache" / "ditf")).expanduser() / "features"


def _frame_setting(args: argparse.Namespace) -> str:
    if (getattr(args, "protocol", None) or "ditf") == "ditf":
        return "original"
    return f"square_pad_{getattr(args, 'pad_size', None) or GEOAWARE_PAD_SIZE}"


def _with_frame(extract: ExtractFn, frame: str, pad_size: int) -> ExtractFn:
    """`extract` itself for the original frame; otherwise `extract` on the square-padded image."""
    if frame == "original":
        return extract

    def extract_padded(image_path: Path, prompt: str) -> torch.Tensor:
        with tempfile.TemporaryDirectory() as folder:
            return extract(square_padded_image(image_path, pad_size, Path(folder) / "padded.png"), prompt)

    return extract_padded


def _cached(extract: ExtractFn, settings: dict, prompts: PromptPolicy,
            args: argparse.Namespace) -> CachedExtractor:
    cache_dtype = getattr(args, "cache_dtype", None)
    return CachedExtractor(
        _with_frame(extract, settings["frame"], getattr(args, "pad_size", None) or GEOAWARE_PAD_SIZE),
        getattr(args, "cache", None) or default_cache_dir(),
        settings,
        prompts=prompts,
        storage_dtype=getattr(torch, cache_dtype) if cache_dtype else None,
        cache_only=bool(getattr(args, "cache_only", False)),
    )


def _prompt_policy(args: argparse.Namespace, default_mode: str) -> PromptPolicy:
    mode = getattr(args, "prompt_mode", None) or default_mode
    captions_path = getattr(args, "captions", None)
    if mode == "caption" and not captions_path:
        raise InvalidArgumentError("--prompt-mode caption needs --captions FILE (the DiTF authors' JSON format)")
    return PromptPolicy(mode, load_captions(captions_path) if mode == "caption" else None)


def extractor_from_args(args: argparse.Namespace) -> CachedExtractor:
    """A CachedExtractor over `ditf.DiTFeaturizer` configured by the CLI options.

    The model is loaded lazily on the first cache miss (only blocks up to --block when given), so a
    fully cached or --cache-only run never loads it. Variants: raw (no LayerNorm, no modulation, no
    discard), ln (LayerNorm), adaln (+AdaLN modulation), ditf (+massive-channel discard). With
    --protocol geoaware images are zero-padded to a square before extraction. The cache key holds
    every setting below plus the image hash and the prompt.
    """
    kwargs = featurizer_kwargs(args)
    device = getattr(args, "device", None) or _default_device()
    dtype = model_dtype(getattr(args, "dtype", None), device)
    prompts = _prompt_policy(args, "class")
    settings = {"model": args.model, "variant": getattr(args, "variant", None) or "ditf",
                "dtype": str(dtype).removeprefix("torch."), "frame": _frame_setting(args),
                "prompt_mode": prompts.mode, **kwargs}
    loaded: dict[str, object] = {}

    def extract(image_path: Path, prompt: str) -> torch.Tensor:
        if "featurizer" not in loaded:
            from ditf import DiTFeaturizer  # the model stack is imported only when a feature is missing

            loaded["featurizer"] = DiTFeaturizer.from_pretrained(args.model, torch_dtype=dtype, device=device,
                                                                 block=kwargs.get("block"))
        return loaded["featurizer"]([image_path], prompt=prompt, progress=False, **kwargs)[0]

    return _cached(extract, settings, prompts, args)


def baseline_extractor_from_args(args: argparse.Namespace) -> CachedExtractor:
    """A CachedExtractor over a `ditf.baselines` extractor (--baseline dift | dinov2-b14 | dinov2-l14),
    with the baseline's published prompt mode unless --prompt-mode is given."""
    from ditf.baselines import BaselineExtractor, get_baseline

    device = getattr(args, "device", None) or _default_device()
    extractor = BaselineExtractor(args.baseline, model_dtype(getattr(args, "dtype", None), device), device)
    prompts = _prompt_policy(args, get_baseline(args.baseline).prompt_mode)
    settings = {"baseline": args.baseline, **extractor.settings, "frame": _frame_setting(args),
                "prompt_mode": prompts.mode}
    return _cached(extractor, settings, prompts, args)


def _default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"
