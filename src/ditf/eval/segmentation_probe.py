"""ADE20K segmentation transfer: a linear probe (or a small head) trained on frozen DiT features.

Protocol (defaults follow DINOv2's ADE20K linear evaluation, `dinov2_vit*14_ade20k_linear_config.py`:
BNHead = BatchNorm + 1x1 conv, AdamW lr 1e-3, weight decay 1e-4, poly decay (power 1) after a
1,500-step linear warm-up, 40,000 steps of 16 images, short side 512, mmsegmentation's ADE20K
conventions; the DiTF paper publishes none of its probe, see `probe_card`):

- features: `features_for(image_path) -> (C, h, w)` from the caller (the cached DiT extractor);
  they are frozen and read image by image, a batch at a time, never all at once.
- head: "linear" (default) BatchNorm2d(C) + 1x1 conv to 150 classes, DINOv2's "linear" head (BNHead; at
  inference the BatchNorm is a fixed affine map, so the probe is linear). The BatchNorm
  standardises each channel, which matters for DiT features whose channels differ in scale by
  orders of magnitude (massive activations); "linear_no_bn" is the 1x1 conv alone and "mlp" a small head
  (1x1 conv to `hidden_channels`, BatchNorm, ReLU, 1x1 conv). Every head is pointwise, so a batch
  of differently sized images is one BatchNorm batch (all their feature pixels).
- labels: annotation resized (nearest) so its short side is `label_short_side` (512, DINOv2's
  training scale), then `reduce_zero_label` (0 -> 255 ignored, k -> k - 1).
- loss: logits bilinearly upsampled (align_corners=False) to the label size, cross-entropy with
  ignore_index=255, averaged over the batch's labelled pixels (mmsegmentation's decode-head loss).
- order: a seeded permutation of the training images per epoch (numpy `default_rng([seed, epoch])`),
  consumed `batch_size` images per step across epoch boundaries; step k's batch is a pure function
  of (seed, k), so the checkpoint's step restores the data order exactly.
- inference: whole image (the features of the full image), logits bilinearly upsampled to the
  annotation size, argmax, +1 -> ids 1..150 written as uint8 PNGs. DINOv2 uses sliding windows
  (512 crops, stride 341); that needs crop-wise features and is not implemented.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from ditf.errors import DatasetError, InvalidArgumentError
from ditf.eval.ade20k import (
    ADE20K_NUM_CLASSES,
    IGNORE_INDEX,
    Ade20kSample,
    label_png_size,
    load_ade20k,
    read_annotation,
    reduce_zero_label,
    write_label_png,
)
from ditf.eval.probe_settings import DINOV2_LINEAR, HEADS, ProbeSettings, probe_card
from ditf.eval.segmentation_metrics import score_segmentation
from ditf.eval.segmentation_plots import plot_class_iou, plot_loss_curve
from ditf.io import atomic_path, write_json_atomic

FeatureProvider = Callable[[Path], torch.Tensor]
"""features_for(image_path) -> (C, h, w) frozen features of the whole image (any float dtype)."""
StepCallback = Callable[[int, float], None]
"""on_step(completed_steps, loss) after every optimizer step (and after its checkpoint, if any)."""

CHECKPOINT_FORMAT = "ditf-segmentation-probe-1"
CHECKPOINT_FILE = "checkpoint.pt"
LOSS_HISTORY_FILE = "loss_history.json"
LOSS_CURVE_FILE = "loss_curve.png"
RUN_RECORD_FILE = "probe_run.json"


# ------------------------------------------------------------------------------------------ the head


class SegmentationProbe(nn.Module):
    """A pointwise classifier of feature pixels: (N, C, h, w) features -> (N, num_classes, h, w) logits."""

    def __init__(self, in_channels: int, num_classes: int = ADE20K_NUM_CLASSES, head: str = "linear",
                 hidden_channels: int = 256):  # fmt: skip
        super().__init__()
        if head not in HEADS:
            raise InvalidArgumentError(f"head={head!r} is not a probe head; choose one of {HEADS}.")
        self.in_channels, self.num_classes, self.head = in_channels, num_classes, head
        layers: list[nn.Module] = []
        width = in_channels
        if head == "linear":
            layers.append(nn.BatchNorm2d(in_channels))
        elif head == "mlp":
            layers += [nn.Conv2d(in_channels, hidden_channels, 1, bias=False), nn.BatchNorm2d(hidden_channels),
                       nn.ReLU(inplace=True)]  # fmt: skip
            width = hidden_channels
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(width, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)  # mmsegmentation's decode-head init
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) float features -> (N, num_classes, h, w) logits."""
        return self.classifier(self.body(features))

    def pixel_logits(self, feature_maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Logits of several (C, h_i, w_i) maps as one batch of pixels -> list of (num_classes, h_i, w_i)."""
        flat = torch.cat([features.flatten(1) for features in feature_maps], dim=1)  # (C, sum of h_i * w_i)
        logits = self(flat[None, :, :, None])[0, :, :, 0]
        sizes = [features.shape[1] * features.shape[2] for features in feature_maps]
        parts = logits.split(sizes, dim=1)
        return [part.reshape(-1, *features.shape[1:]) for part, features in zip(parts, feature_maps)]


def build_probe(in_channels: int, settings: ProbeSettings, num_classes: int = ADE20K_NUM_CLASSES) -> SegmentationProbe:
    """A freshly initialised probe; its weights depend only on `settings.seed` (the global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return SegmentationProbe(in_channels, num_classes, settings.head, settings.hidden_channels)


# --------------------------------------------------------------------------------------- schedule


def learning_rate_at(step: int, total_steps: int, settings: ProbeSettings) -> float:
    """Learning rate of 0-based step `step` (mmcv's poly policy with linear warm-up)."""
    progress = min(step / max(total_steps, 1), 1.0)
    rate = (settings.learning_rate - settings.min_learning_rate) * (1 - progress) ** settings.poly_power
    rate += settings.min_learning_rate
    if step < settings.warmup_steps:
        rate *= 1 - (1 - step / settings.warmup_steps) * (1 - settings.warmup_ratio)
    return rate


def batch_indices(step: int, num_images: int, batch_size: int, seed: int) -> list[int]:
    """Indices of the training images of 0-based step `step`: positions step*B .. step*B+B-1 of the
    concatenated per-epoch permutations, each `numpy.random.default_rng([seed, epoch]).permutation(n)`."""
    indices, orders = [], {}
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch = position // num_images
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(num_images)
        indices.append(int(orders[epoch][position % num_images]))
    return indices


# ------------------------------------------------------------------------------------- data access


def training_labels(annotation: Path, short_side: int | None) -> torch.Tensor:
    """(H', W') int64 train ids (0..149, 255 ignored) of an annotation resized (nearest) to `short_side`."""
    labels = read_annotation(annotation)
    if short_side is not None:
        height, width = labels.shape
        scale = short_side / min(height, width)
        size = (max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5)))
        if size != (width, height):
            labels = np.array(Image.fromarray(labels.astype(np.uint8)).resize(size, Image.Resampling.NEAREST))
    return torch.from_numpy(reduce_zero_label(labels))


def checked_features(features: Any, image: Path, in_channels: int | None = None) -> torch.Tensor:
    """`features` as a float32 (C, h, w) tensor, checked to have `in_channels` channels when given."""
    if not isinstance(features, torch.Tensor) or features.ndim != 3:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise InvalidArgumentError(f"features_for must return a (C, h, w) tensor for {image}; got {shape}.")
    if in_channels is not None and features.shape[0] != in_channels:
        raise InvalidArgumentError(
            f"features_for returned {features.shape[0]} channels for {image}, but the probe was built for "
            f"{in_channels}; every image must be featurised with the same model, block and settings."
        )
    return features.detach().float()


# ---------------------------------------------------------------------------------------- training


@dataclass
class TrainedProbe:
    """The result of `train_probe`: the probe (eval mode) and how it was trained."""

    probe: SegmentationProbe
    settings: ProbeSettings
    total_steps: int
    losses: list[float]
    resumed_from_step: int
    checkpoint: Path
    loss_curve: Path
    loss_history: Path


def train_probe(
    samples: Sequence[Ade20kSample],
    features_for: FeatureProvider,
    output_dir: str | Path,
    settings: ProbeSettings = DINOV2_LINEAR,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    on_step: StepCallback | None = None,
) -> TrainedProbe:
    """Train a probe on frozen features of `samples`, resuming from `output_dir/checkpoint.pt` if present.

    Every `settings.checkpoint_every` steps (and after the last) the checkpoint is replaced atomically
    with model (including BatchNorm statistics), optimizer state, step and loss history, and
    `loss_history.json` is rewritten; a killed run continues from the checkpoint and ends with the
    same weights, bit for bit, as an uninterrupted one. No random-generator state needs saving: the
    initial weights depend only on the seed, and step k's images only on (seed, k). A checkpoint of
    other settings or other training images is refused. At the end `loss_curve.png` is drawn.

    Args:
        samples: training (image, annotation) pairs, e.g. `load_ade20k(root, "training")`.
        features_for: `features_for(image_path) -> (C, h, w)` frozen features (called once per use).
        output_dir: folder for checkpoint.pt, loss_history.json and loss_curve.png.
        settings: `ProbeSettings` (DINOv2 linear protocol by default).
        device: where the probe trains; features are moved there batch by batch.
        progress: show a tqdm bar over steps with the current loss.
        on_step: called as on_step(completed_steps, loss) after each step.

    Returns:
        `TrainedProbe` with the probe in eval mode.
    """
    if not samples:
        raise DatasetError("train_probe got no training samples; pass load_ade20k(root, 'training').")
    output_dir = Path(output_dir)
    checkpoint_path = output_dir / CHECKPOINT_FILE
    total = settings.total_steps(len(samples))
    stems = "\n".join(sample.stem for sample in samples)
    identity = {"settings": asdict(settings), "training_images": hashlib.sha256(stems.encode()).hexdigest(),
                "total_steps": total}  # fmt: skip
    state = _load_checkpoint(checkpoint_path, identity)
    if state is None:
        first = checked_features(features_for(samples[0].image), samples[0].image)
        probe = build_probe(first.shape[0], settings).to(device)
        start, losses = 0, []
    else:
        probe = build_probe(state["in_channels"], settings).to(device)
        probe.load_state_dict(state["model"])
        start, losses = state["step"], list(state["loss_history"])
    optimizer = _optimizer(probe, settings)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    probe.train()
    bar = tqdm(total=total, initial=start, desc="segmentation probe", disable=not progress)
    for step in range(start, total):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, total, settings)
        batch = [samples[index] for index in batch_indices(step, len(samples), settings.batch_size, settings.seed)]
        loss = _train_step(probe, optimizer, batch, features_for, settings, device)
        losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == total:
            _save_checkpoint(checkpoint_path, identity, probe, optimizer, step + 1, losses)
            _write_history(output_dir / LOSS_HISTORY_FILE, losses, total)
        if on_step is not None:
            on_step(step + 1, loss)
    bar.close()
    history_path = _write_history(output_dir / LOSS_HISTORY_FILE, losses, total)
    curve_path = plot_loss_curve(losses, output_dir / LOSS_CURVE_FILE)
    probe.eval()
    return TrainedProbe(probe, settings, total, losses, start, checkpoint_path, curve_path, history_path)


def _write_history(path: Path, losses: list[float], total: int) -> Path:
    return write_json_atomic(path, {"loss_per_step": losses, "steps_done": len(losses), "total_steps": total})


def _optimizer(probe: nn.Module, settings: ProbeSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(probe.parameters(), lr=settings.learning_rate, momentum=settings.momentum,
                               weight_decay=settings.weight_decay)  # fmt: skip
    return torch.optim.AdamW(probe.parameters(), lr=settings.learning_rate, betas=(0.9, 0.999),
                             weight_decay=settings.weight_decay)  # fmt: skip


def _train_step(
    probe: SegmentationProbe,
    optimizer: torch.optim.Optimizer,
    batch: Sequence[Ade20kSample],
    features_for: FeatureProvider,
    settings: ProbeSettings,
    device: str | torch.device,
) -> float:
    """One optimizer step on a batch; returns its loss (mean cross-entropy over labelled pixels).

    The head runs once on all feature pixels of the batch; each image's logits are then upsampled
    and scored one image at a time against a detached copy, so only one full-size logit map is alive.
    """
    features = [checked_features(features_for(sample.image), sample.image, probe.in_channels).to(device)
                for sample in batch]  # fmt: skip
    labels = [training_labels(sample.annotation, settings.label_short_side).to(device) for sample in batch]
    labelled = max(1, sum(int((label != IGNORE_INDEX).sum()) for label in labels))
    optimizer.zero_grad(set_to_none=True)
    logits = probe.pixel_logits(features)
    detached = [part.detach().requires_grad_() for part in logits]
    total_loss = 0.0
    for part, label in zip(detached, labels):
        upsampled = F.interpolate(part[None], size=label.shape, mode="bilinear", align_corners=False)
        loss = F.cross_entropy(upsampled, label[None], ignore_index=IGNORE_INDEX, reduction="sum") / labelled
        loss.backward()
        total_loss += loss.item()
    torch.autograd.backward(logits, [part.grad for part in detached])
    optimizer.step()
    return total_loss


def _save_checkpoint(path: Path, identity: dict, probe: SegmentationProbe, optimizer: torch.optim.Optimizer,
                     step: int, losses: list[float]) -> None:  # fmt: skip
    state = {
        "format": CHECKPOINT_FORMAT,
        "identity": json.dumps(identity, sort_keys=True),
        "step": step,
        "in_channels": probe.in_channels,
        "model": probe.state_dict(),
        "optimizer": optimizer.state_dict(),
        "loss_history": list(losses),
    }
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


def _load_checkpoint(path: Path, identity: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a damaged file
        raise DatasetError(
            f"probe checkpoint {path} cannot be read ({type(err).__name__}: {err}); delete it to train from scratch."
        ) from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DatasetError(f"{path} is not a ditf segmentation-probe checkpoint; delete it or choose another folder.")
    if state["identity"] != json.dumps(identity, sort_keys=True):
        saved = json.loads(state["identity"])
        changed = sorted(key for key in identity if saved.get(key) != identity[key])
        raise InvalidArgumentError(
            f"checkpoint {path} belongs to a probe trained with other {', '.join(changed)}; resume with the same "
            "settings and training images, or choose a new output folder (or delete it) to train from scratch."
        )
    return state


def load_trained_probe(checkpoint: str | Path, device: str | torch.device = "cpu") -> SegmentationProbe:
    """The probe stored in a `train_probe` checkpoint, in eval mode."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise DatasetError(f"probe checkpoint {checkpoint} does not exist; train the probe first (train_probe).")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    settings = ProbeSettings(**json.loads(state["identity"])["settings"])
    probe = build_probe(state["in_channels"], settings).to(device)
    probe.load_state_dict(state["model"])
    return probe.eval()


# -------------------------------------------------------------------------------------- prediction


@torch.no_grad()
def upsampled_argmax(logits: torch.Tensor, size: tuple[int, int], class_chunk: int = 32) -> torch.Tensor:
    """argmax over classes of (K, h, w) logits bilinearly upsampled to `size` = (H, W); (H, W) int64.

    Classes are upsampled `class_chunk` at a time (interpolation is per class, so this equals the
    argmax of the full upsampled map; ties go to the lower class) to bound memory at full resolution.
    """
    best_value = best_index = None
    for start in range(0, logits.shape[0], class_chunk):
        chunk = logits[None, start : start + class_chunk]
        chunk = F.interpolate(chunk, size=size, mode="bilinear", align_corners=False)[0]
        value, index = chunk.max(dim=0)
        index = index + start
        if best_value is None:
            best_value, best_index = value, index
        else:
            better = value > best_value
            best_value = torch.where(better, value, best_value)
            best_index = torch.where(better, index, best_index)
    return best_index


@torch.no_grad()
def predict_segmentation(
    probe: SegmentationProbe,
    samples: Sequence[Ade20kSample],
    features_for: FeatureProvider,
    output_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, str]:
    """Whole-image predictions `output_dir/<stem>.png` (uint8 ids 1..150, annotation size), written atomically.

    A PNG that already exists is kept (writes are atomic, so it is complete): a killed run resumes.

    Returns:
        {stem: "predicted" | "skipped"}.
    """
    output_dir = Path(output_dir)
    probe = probe.to(device).eval()
    status = {}
    for sample in tqdm(samples, desc="segmentation predictions", disable=not progress):
        target = output_dir / f"{sample.stem}.png"
        if target.is_file():
            status[sample.stem] = "skipped"
            continue
        features = checked_features(features_for(sample.image), sample.image, probe.in_channels).to(device)
        logits = probe(features[None])[0]
        ids = upsampled_argmax(logits, label_png_size(sample.annotation)) + 1
        write_label_png(target, ids.cpu().numpy())
        status[sample.stem] = "predicted"
    return status


# ------------------------------------------------------------------------------------------ a run


def run_probe(
    root: str | Path,
    features_for: FeatureProvider,
    output_dir: str | Path,
    *,
    settings: ProbeSettings = DINOV2_LINEAR,
    feature_record: dict[str, Any] | None = None,
    train_split: str = "training",
    eval_split: str = "validation",
    device: str | torch.device = "cpu",
    progress: bool = True,
    on_step: StepCallback | None = None,
) -> dict[str, Any]:
    """Train a probe on `train_split`, predict `eval_split`, score it; every stage resumes after a kill.

    Writes into `output_dir`: probe_run.json (the run's settings; a folder of another run is
    refused), train/ (checkpoint.pt, loss_history.json, loss_curve.png), pred/<stem>.png,
    scores.json, class_iou.png and results.json (the returned dict).

    Args:
        root: the folder holding ADEChallengeData2016/.
        features_for: `features_for(image_path) -> (C, h, w)` frozen features of the whole image.
        output_dir: the run folder.
        settings: probe and training settings (DINOv2 linear protocol by default).
        feature_record: JSON description of the features (model, block, timestep, image size, ...).
        train_split, eval_split: ADE20K splits to train on and to score.
        device, progress, on_step: as in `train_probe`.

    Returns:
        {"scores": score_segmentation(...), "training": {...}, "probe_card": probe_card(...),
         "files": {...}}.
    """
    output_dir = Path(output_dir)
    train_samples = load_ade20k(root, train_split)
    eval_samples = load_ade20k(root, eval_split)
    record = {
        "settings": asdict(settings),
        "features": feature_record or {},
        "splits": {"train": train_split, "eval": eval_split},
        "images": {"train": len(train_samples), "eval": len(eval_samples)},
    }
    _claim_run_folder(output_dir, record)
    trained = train_probe(train_samples, features_for, output_dir / "train", settings, device=device,
                          progress=progress, on_step=on_step)  # fmt: skip
    predictions = output_dir / "pred"
    predict_segmentation(trained.probe, eval_samples, features_for, predictions, device=device, progress=progress)
    scores = score_segmentation(root, predictions, eval_split, output=output_dir / "scores.json", progress=progress)
    class_plot = plot_class_iou(scores, output_dir / "class_iou.png")
    results = {
        "scores": scores,
        "training": {
            "settings": asdict(settings),
            "total_steps": trained.total_steps,
            "train_images": len(train_samples),
            "final_loss": trained.losses[-1] if trained.losses else None,
            "resumed_from_step": trained.resumed_from_step,
        },
        "features": feature_record or {},
        "probe_card": probe_card(settings, trained.probe.in_channels, train_split, eval_split),
        "files": {
            "checkpoint": str(trained.checkpoint),
            "loss_history": str(trained.loss_history),
            "loss_curve": str(trained.loss_curve),
            "predictions": str(predictions),
            "scores": str(output_dir / "scores.json"),
            "class_iou_plot": str(class_plot),
        },
    }
    write_json_atomic(output_dir / "results.json", results)
    return results


def _claim_run_folder(output_dir: Path, record: dict[str, Any]) -> None:
    """Write the run record, or check that an existing one matches (JSON round trip on both sides)."""
    path = output_dir / RUN_RECORD_FILE
    wanted = json.loads(json.dumps(record))
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != wanted:
            changed = sorted(key for key in wanted if existing.get(key) != wanted[key])
            raise InvalidArgumentError(
                f"{output_dir} holds a segmentation probe run with other {', '.join(changed)} ({path}); pick a new "
                "output folder, or delete that one to recompute."
            )
        return
    write_json_atomic(path, wanted)
