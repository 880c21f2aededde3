"""`ProbeSettings`: everything that determines a trained segmentation probe, DINOv2's ADE20K linear protocol by
default, and the probe card that states the choices of a run. Imports no torch (the command line offers these).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ditf.errors import InvalidArgumentError

HEADS = ("linear", "linear_no_bn", "mlp")
"""Probe heads: DINOv2's linear head (BatchNorm + 1x1 conv), the 1x1 conv alone, and a small two-layer head."""
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class ProbeSettings:
    """Everything that determines a trained probe; defaults are DINOv2's ADE20K linear protocol.

    Attributes:
        head: "linear" (BatchNorm + 1x1 conv, DINOv2's linear head), "linear_no_bn" (1x1 conv) or "mlp"
            (1x1 conv, BatchNorm, ReLU, 1x1 conv).
        hidden_channels: width of the "mlp" head's hidden layer.
        steps: optimizer steps (iterations); ignored when `epochs` is given.
        epochs: if given, steps = ceil(epochs * training images / batch_size).
        batch_size: images per step (DINOv2: 2 per GPU x 8 GPUs = 16).
        optimizer: "adamw" (DINOv2, betas 0.9/0.999) or "sgd" (with `momentum`).
        learning_rate, weight_decay, momentum: optimizer settings (DINOv2: 1e-3, 1e-4).
        warmup_steps, warmup_ratio: linear warm-up from lr * warmup_ratio (DINOv2: 1500, 1e-6).
        poly_power, min_learning_rate: poly decay lr = (lr - min) * (1 - step / steps) ** power + min.
        label_short_side: training labels are resized (nearest) to this short side; None keeps them.
        seed: seeds the head's initial weights and the per-epoch image order.
        checkpoint_every: write the checkpoint after every this many steps (and after the last).
    """

    head: str = "linear"
    hidden_channels: int = 256
    steps: int = 40_000
    epochs: int | None = None
    batch_size: int = 16
    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_steps: int = 1_500
    warmup_ratio: float = 1e-6
    poly_power: float = 1.0
    min_learning_rate: float = 0.0
    label_short_side: int | None = 512
    seed: int = 0
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise InvalidArgumentError(f"head={self.head!r} is not a probe head; choose one of {HEADS}.")
        if self.optimizer not in OPTIMIZERS:
            raise InvalidArgumentError(f"optimizer={self.optimizer!r} is not supported; choose one of {OPTIMIZERS}.")
        positive = {"steps": self.steps, "batch_size": self.batch_size, "checkpoint_every": self.checkpoint_every,
                    "hidden_channels": self.hidden_channels, "learning_rate": self.learning_rate}  # fmt: skip
        if self.epochs is not None:
            positive["epochs"] = self.epochs
        if self.label_short_side is not None:
            positive["label_short_side"] = self.label_short_side
        for name, value in positive.items():
            if not value > 0:
                raise InvalidArgumentError(f"{name}={value} must be > 0 (ProbeSettings).")
        if self.warmup_steps < 0 or not 0 < self.warmup_ratio <= 1:
            raise InvalidArgumentError(
                f"warmup_steps={self.warmup_steps} must be >= 0 and warmup_ratio={self.warmup_ratio} in (0, 1]."
            )

    def total_steps(self, num_images: int) -> int:
        """Optimizer steps of a run on `num_images` training images."""
        if self.epochs is None:
            return self.steps
        return math.ceil(self.epochs * num_images / self.batch_size)


DINOV2_LINEAR = ProbeSettings()
"""DINOv2's ADE20K linear protocol, adapted to frozen whole-image features (see the module docstring)."""


def probe_card(settings: ProbeSettings, in_channels: int, train_split: str = "training",
               eval_split: str = "validation") -> dict[str, Any]:  # fmt: skip
    """What the probe run did, where each choice comes from, and what the DiTF paper leaves unpublished."""
    head = {
        "linear": f"BatchNorm2d({in_channels}) + 1x1 conv -> 150 classes (DINOv2 BNHead)",
        "linear_no_bn": f"1x1 conv {in_channels} -> 150 classes",
        "mlp": f"1x1 conv {in_channels} -> {settings.hidden_channels}, BatchNorm, ReLU, 1x1 conv -> 150 classes",
    }[settings.head]
    return {
        "task": "ADE20K semantic segmentation transfer with frozen features",
        "head": head,
        "features": "frozen, supplied per image by the caller (whole image); never fine-tuned",
        "training": (
            f"{settings.optimizer} lr {settings.learning_rate:g}, weight decay {settings.weight_decay:g}, "
            f"poly decay (power {settings.poly_power:g}) after {settings.warmup_steps} linear warm-up steps, "
            f"batch {settings.batch_size} images, seed {settings.seed}, on ADE20K {train_split}"
        ),
        "labels": (
            f"annotations resized (nearest) to short side {settings.label_short_side}, reduce_zero_label "
            "(0 -> 255 ignored, k -> k - 1); cross-entropy on logits bilinearly upsampled to the label size"
        ),
        "inference": "whole image; logits bilinearly upsampled to the annotation size; argmax + 1 -> ids 1..150",
        "scoring": f"mmsegmentation IoUMetric semantics on ADE20K {eval_split} (areas summed, nanmean over classes)",
        "protocol_source": (
            "DINOv2 linear ADE20K evaluation (BNHead, AdamW 1e-3, wd 1e-4, poly, 1500 warm-up, 40k iterations x "
            "16 images, short side 512)"
        ),
        "deviations_from_dinov2": [
            "whole-image inference instead of sliding 512x512 windows with stride 341",
            "no training augmentation (random scale 0.5-2, 512 crops, flips, photometric): features are frozen and "
            "cached per whole image",
            "the features are DiT features chosen by the caller, not the last ViT block",
        ],
        "not_published_by_ditf": [
            "head type (linear, BatchNorm-linear or a larger decoder)",
            "optimizer, learning rate, schedule, iterations, batch size",
            "input resolution, augmentation, sliding or whole-image inference",
            "which block / timestep / prompt the ADE20K features use",
        ],
        "paper_reference": "DiTF (Gan et al., NeurIPS 2025) Table 6: DiTF_flux 54.8 mIoU on ADE20K",
    }
