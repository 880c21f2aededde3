"""`ditf eval ade20k` (train a probe on frozen features, predict, score) and `ditf eval seg-score` (score any
predictions), over `ditf.eval.evaluate_ade20k` and `ditf.eval.score_segmentation`."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from ditf.cli.common import HelpFormatter, add_model_args, add_settings_args
from ditf.cli.eval_sources import add_source_args, source_options
from ditf.cli.outputs import FIGURE_SUFFIXES, check_output_file, check_output_folder
from ditf.errors import InvalidArgumentError
from ditf.eval.ade20k import ADE20K_SPLITS
from ditf.eval.probe_settings import DINOV2_LINEAR, HEADS, OPTIMIZERS

PROBE_FLAGS = ("steps", "epochs", "batch_size", "optimizer", "learning_rate", "weight_decay", "warmup_steps",
               "label_short_side", "hidden_channels", "checkpoint_every")
"""`ProbeSettings` fields with a flag of the same name (--steps, --batch-size, ...); --probe-seed sets `seed`."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `seg-score` and `ade20k` to `ditf eval`."""
    score = subparsers.add_parser(
        "seg-score", formatter_class=HelpFormatter,
        help="mIoU of ADE20K predictions (mmsegmentation's IoUMetric semantics; no model needed)",
        description=("Score <predictions>/<stem>.png (single-channel, ids 1..150 as in the annotations, 0 = no class) "
                     "against an ADE20K split: reduce_zero_label, ignore 255, 150 classes, areas summed over the "
                     "split, nanmean over classes; aAcc, mIoU, mAcc and per-class IoU / Acc in percent."),
    )
    score.add_argument("--root", required=True, help="the folder holding ADEChallengeData2016/ (or that folder)")
    score.add_argument("--predictions", required=True, help="folder with one <stem>.png per annotation of the split")
    score.add_argument("--split", choices=ADE20K_SPLITS, default="validation", help="ADE20K split")
    score.add_argument("-o", "--output", help="write the scores JSON here (atomically)")
    score.add_argument("--plot", help="also save the per-class IoU bar chart here (.png, .pdf, ...)")
    score.add_argument("--quiet", action="store_true", help="no progress bar")
    score.set_defaults(func=run_score)

    ade = subparsers.add_parser(
        "ade20k", formatter_class=HelpFormatter,
        help="ADE20K segmentation transfer: a probe trained on frozen features, predictions, mIoU",
        description=("Train a probe on frozen, cached features of ADE20K training (DINOv2's linear protocol by "
                     "default: BatchNorm + 1x1 conv, AdamW 1e-3, 40k steps of 16 images, labels at short side 512), "
                     "predict validation with whole-image inference (ids 1..150 PNGs), and score them like "
                     "`ditf eval seg-score`. Seeded; a killed run resumes from its checkpoint."),
    )
    data = ade.add_argument_group("data and output")
    data.add_argument("--root", required=True, help="the folder holding ADEChallengeData2016/ (or that folder)")
    data.add_argument("-o", "--output", required=True,
                      help="run folder: train/ (checkpoint, loss curve), pred/*.png, scores.json, results.json")
    data.add_argument("--train-split", choices=ADE20K_SPLITS, default="training", help="split the probe learns on")
    data.add_argument("--eval-split", choices=ADE20K_SPLITS, default="validation", help="split predicted and scored")
    data.add_argument("--quiet", action="store_true", help="no progress bars")
    probe = ade.add_argument_group("probe (default: DINOv2's ADE20K linear protocol)")
    probe.add_argument("--probe", choices=HEADS, default="linear",
                       help="linear: BatchNorm + 1x1 conv (DINOv2); linear_no_bn: 1x1 conv; mlp: a small head")
    probe.add_argument("--steps", type=int, help=f"optimizer steps (default: {DINOV2_LINEAR.steps})")
    probe.add_argument("--epochs", type=int, help="train this many epochs instead of --steps")
    probe.add_argument("--batch-size", type=int, help=f"images per step (default: {DINOV2_LINEAR.batch_size})")
    probe.add_argument("--optimizer", choices=OPTIMIZERS, help=f"(default: {DINOV2_LINEAR.optimizer})")
    probe.add_argument("--learning-rate", type=float, help=f"(default: {DINOV2_LINEAR.learning_rate:g})")
    probe.add_argument("--weight-decay", type=float, help=f"(default: {DINOV2_LINEAR.weight_decay:g})")
    probe.add_argument("--warmup-steps", type=int, help=f"linear warm-up steps (default: {DINOV2_LINEAR.warmup_steps})")
    probe.add_argument("--label-short-side", type=int,
                       help=f"training labels resized (nearest) to this short side (default: {DINOV2_LINEAR.label_short_side})")
    probe.add_argument("--hidden-channels", type=int, help=f"width of the mlp head (default: {DINOV2_LINEAR.hidden_channels})")
    probe.add_argument("--checkpoint-every", type=int,
                       help=f"steps between checkpoints (default: {DINOV2_LINEAR.checkpoint_every})")
    probe.add_argument("--probe-seed", type=int, help="seed of the probe's weights and image order (default: 0)")
    add_source_args(ade, "<split>/<image stem>.safetensors")
    add_model_args(ade, required=False)
    add_settings_args(ade)
    ade.set_defaults(func=run_ade20k)


def probe_overrides(args: argparse.Namespace) -> dict:
    """The `ProbeSettings` fields the command line gave."""
    overrides = {name: getattr(args, name) for name in PROBE_FLAGS if getattr(args, name) is not None}
    if args.probe_seed is not None:
        overrides["seed"] = args.probe_seed
    return overrides


def run_ade20k(args: argparse.Namespace) -> int:
    """Train, predict and score ADE20K (or fill a shard of the cache); print the scores and the probe card."""
    from ditf.cli.common import device_of
    from ditf.eval.api_segmentation import evaluate_ade20k
    from ditf.eval.probe_settings import ProbeSettings

    output = check_output_folder(args.output, "--output")
    settings = ProbeSettings(**probe_overrides(args))  # checked before any model loads
    options = source_options(args, task="ade20k")
    results = evaluate_ade20k(args.root, output, probe=args.probe, probe_settings=settings,
                              train_split=args.train_split, eval_split=args.eval_split,
                              device=device_of(args) if args.device else None, progress=not args.quiet, **options)
    if args.shard is not None:
        print(json.dumps(results))
        return 0
    print(format_scores(results["scores"]))
    print(format_card("probe card", results["probe_card"]))
    print(f"wrote {output / 'results.json'} (loss curve {results['files']['loss_curve']})")
    return 0


def run_score(args: argparse.Namespace) -> int:
    """Score --predictions, print the scores (and write --output, --plot)."""
    from ditf.eval.segmentation_metrics import score_segmentation

    if args.output is not None:
        check_output_file(args.output, "--output", (".json",))
    if args.plot is not None:
        check_output_file(args.plot, "--plot", FIGURE_SUFFIXES)
    if Path(args.predictions).is_file():
        raise InvalidArgumentError(f"--predictions {args.predictions!r} is a file; pass the folder that holds one "
                                   "<stem>.png per annotation.")
    scores = score_segmentation(args.root, args.predictions, args.split, output=args.output, progress=not args.quiet)
    print(format_scores(scores))
    print(format_card("protocol card", scores["protocol"]))
    if args.output is not None:
        print(f"wrote {args.output}")
    if args.plot is not None:
        from ditf.eval.segmentation_plots import plot_class_iou

        print(f"wrote {plot_class_iou(scores, args.plot)}")
    return 0


def format_scores(scores: dict) -> str:
    """aAcc, mIoU, mAcc (percent) and the number of images, one line."""
    return (f"ADE20K {scores['protocol']['split']}: mIoU {scores['mIoU']:.2f}  mAcc {scores['mAcc']:.2f}  "
            f"aAcc {scores['aAcc']:.2f}  ({scores['num_images']} images, {len(scores['per_class'])} classes present)")


def format_card(title: str, card: dict) -> str:
    """A card (a dict of plain-language entries; lists become lines) as aligned, wrapped text."""
    lines = [f"{title}:"]
    width = max(len(key) for key in card)
    for key, value in card.items():
        values = value if isinstance(value, list) else [value]
        for number, item in enumerate(values):
            wrapped = textwrap.wrap(str(item), width=92) or [""]
            label = key if number == 0 else ""
            lines.append(f"  {label:<{width}} {'- ' if isinstance(value, list) else ''}{wrapped[0]}")
            lines.extend(f"  {'':<{width}} {line}" for line in wrapped[1:])
    return "\n".join(lines)
