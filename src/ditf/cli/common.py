"""Options shared by commands that run a DiT: which model, where, and the DiTF settings."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ditf.errors import InvalidArgumentError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_model_args(parser: argparse.ArgumentParser, block: int | None = None, t: float | None = None) -> None:
    """Add --model, placement and DiTF setting options (defaults: the model's preset)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True,
                       help="preset alias (e.g. flux-dev), hub id, local diffusers folder or single-file checkpoint")
    group.add_argument("--config", help="folder with the diffusers config.json, for single-file checkpoints")
    group.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                       help="weights dtype (default: bf16 on CUDA, fp32 on CPU)")
    group.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    group.add_argument("--offload", choices=["model", "sequential"], default=None,
                       help="keep weights on the CPU and move them to the device when used (accelerate)")
    settings = parser.add_argument_group("DiTF settings (default: the model preset)")
    settings.add_argument("--block", type=int, default=block, help="global block index k")
    settings.add_argument("--t", type=float, default=t, help="timestep in 0..1000")
    settings.add_argument("--ensemble", type=int, default=None, help="number of noise draws averaged")
    settings.add_argument("--resolution", type=int, default=None, help="long image side in pixels")
    settings.add_argument("--prompt", default="", help="text prompt (default: empty)")
    settings.add_argument("--discard", default="auto",
                          help="massive channels to zero: auto, none, or a comma list like 154,1446")
    settings.add_argument("--seed", type=int, default=0)
    settings.add_argument("--max-batch", type=int, default=None, help="ensemble members per forward pass")


def parse_discard(text: str) -> Any:
    """'auto' | 'none' | '154,1446' -> the featurizer's `discard` argument."""
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError as err:
        raise InvalidArgumentError(f"--discard {text!r}: use auto, none, or channel numbers like 154,1446.") from err


def featurizer_from_args(args: argparse.Namespace):
    """Load the DiTFeaturizer the options describe, with only the blocks up to --block (or the preset's block)."""
    from ditf import DiTFeaturizer

    from ditf.registry import PRESETS, preset_for_hub_id

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    preset = PRESETS.get(args.model) or preset_for_hub_id(args.model)
    block = args.block if args.block is not None or preset is None else preset.block
    return DiTFeaturizer.from_pretrained(args.model, torch_dtype=dtype, device=device, block=block,
                                         offload=args.offload, config=args.config)


def feature_settings(args: argparse.Namespace, fx, resolution: bool = True) -> dict[str, Any]:
    """The DiTF keyword arguments for `fx(...)`, with preset defaults filled in so they can be recorded.

    `resolution=False` leaves the image size out, for callers that pass `size=` per image."""
    preset = fx.preset

    def pick(value: Any, name: str) -> Any:
        if value is not None:
            return value
        if preset is None:
            raise InvalidArgumentError(f"--{name.replace('_', '-')} is required: {args.model!r} has no preset.")
        return getattr(preset, name)

    settings = {"block": pick(args.block, "block"), "t": pick(args.t, "t"), "ensemble": pick(args.ensemble, "ensemble"),
                "prompt": args.prompt, "discard": parse_discard(args.discard), "seed": args.seed, "max_batch": args.max_batch}
    if resolution:
        settings["resolution"] = pick(args.resolution, "resolution")
    return settings
