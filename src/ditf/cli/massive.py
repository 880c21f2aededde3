"""`ditf massive scan` and `ditf generate`: thin wrappers over `ditf.massive.scan` and `ditf.massive.generate`."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ditf.errors import InvalidArgumentError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `massive scan` and the top-level `generate`."""
    massive = subparsers.add_parser("massive", help="massive-activation analysis")
    commands = massive.add_subparsers(dest="massive_command", required=True)

    scan = commands.add_parser("scan", help="record a generation (or one noised image) and report massive activations")
    scan.add_argument("--prompt", default="", help="prompt to generate (or to condition the image forward on)")
    scan.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    scan.add_argument("--image", default=None, help="scan one image noised to --t instead of a generation")
    scan.add_argument("--t", type=float, default=None, help="timestep 0..1000 for --image (DiTF: 261)")
    scan.add_argument("--resolution", type=int, default=None, help="long side for --image (default: preset)")
    scan.add_argument("--blocks", default="all", help="blocks to record: all, last, 5-20, 3,7 (default: all)")
    scan.add_argument("--record-steps", default="all", help="steps to record: all, last, 0-3 (default: all)")
    scan.add_argument("--branch", default="cond", help="CFG branch to record: cond or uncond (default: cond)")
    scan.add_argument("--rule", action="append", default=None,
                      help="detection rule, repeatable: ratio[:T], sun[:ABS:REL], topk:K[:STAT] (default: ratio, sun)")
    scan.add_argument("--plot-blocks", default=None, help="blocks with full-tensor figures (default: 4 spread)")
    _add_generation_args(scan)
    scan.add_argument("-o", "--output", required=True, help="output folder for the report, statistics and figures")
    scan.set_defaults(func=run_scan)

    generate = subparsers.add_parser("generate", help="generate an image while disrupting, guiding or transporting MAs")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    edits = generate.add_argument_group("disruption")
    edits.add_argument("--disrupt", action="append", default=None, metavar="CHANNELS@BLOCKS",
                       help="e.g. auto@all, 154,1446@0-18, bottom@all, random:4@5-20, matched@all (repeatable)")
    edits.add_argument("--op", default=None, help="zero (default), mean, const:V, scale:R or clamp:V")
    edits.add_argument("--disrupt-steps", default=None, help="steps to disrupt: all (default), last, 0-3")
    edits.add_argument("--disrupt-branch", default=None, help="CFG branch to disrupt: all (default), cond, uncond")
    guidance = generate.add_argument_group("Detail Guidance (Gan et al. 2025; m, w and the window are unpublished)")
    guidance.add_argument("--detail-guidance", type=float, default=None, metavar="W", help="DG scale w")
    guidance.add_argument("--dg-layer", type=int, default=None, metavar="M", help="block m whose MAs are disrupted")
    guidance.add_argument("--dg-steps", default=None, help="steps where DG is active: all (default), 0-10, ...")
    guidance.add_argument("--dg-channels", default=None, help="MA channels at m: auto (default), 154,1446, ...")
    guidance.add_argument("--dg-op", default=None, help="disruption: zero (default), scale:R, ...")
    guidance.add_argument("--dg-cfg-scale", type=float, default=None,
                          help="the pipeline's CFG scale g when it runs CFG (the DG term is divided by g)")
    transport = generate.add_argument_group("activation transport (Turri et al. 2026)")
    transport.add_argument("--transport-from", default=None, metavar="PROMPT", help="source prompt (same seed)")
    transport.add_argument("--transport-layers", default=None, help="blocks to transport into, e.g. 5-20")
    transport.add_argument("--transport-steps", default=None, help="steps: all (default), 0-10, ...")
    transport.add_argument("--transport-channels", default=None, help="channels m: auto (default), all, 11,42, ...")
    transport.add_argument("--transport-mask", default=None, choices=["none", "cluster"],
                           help="spatial mask p: none (every token, default) or cluster (K-means on MA channels)")
    _add_generation_args(generate)
    generate.add_argument("-o", "--output", required=True, help="image path (.png); the record goes next to it (.json)")
    generate.set_defaults(func=run_generate)


def _add_generation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and sampling")
    group.add_argument("--model", required=True, help="preset alias (e.g. flux-dev), hub id or local pipeline folder")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--height", type=int, default=None, help="image height in pixels (default: the pipeline's)")
    group.add_argument("--width", type=int, default=None, help="image width in pixels (default: the pipeline's)")
    group.add_argument("--guidance", type=float, default=None, help="the pipeline's guidance_scale (default: its own)")
    group.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                       help="weights dtype (default: bf16 on CUDA, fp32 on CPU)")
    group.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    group.add_argument("--offload", choices=["model", "sequential"], default=None,
                       help="keep weights on the CPU and move them to the device when used (diffusers offload)")


def load_pipeline(args: argparse.Namespace) -> tuple[Any, Any]:
    """Load the full diffusers pipeline of --model on --device (or offloaded); return (pipeline, preset)."""
    from ditf.cli.common import DTYPES
    from ditf.features.featurizer import check_dtype_on_device
    from ditf.loading import load_components

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    check_dtype_on_device(dtype, device)
    components = load_components(args.model, torch_dtype=dtype)
    pipe = components.pipeline
    if pipe is None:
        raise InvalidArgumentError(
            f"--model {args.model!r} is a bare transformer; generation and scans need the full diffusers pipeline "
            "(a folder with model_index.json, a hub id or a preset alias)."
        )
    if args.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif args.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe, components.preset


def parse_rule(text: str) -> Any:
    """'ratio[:T]' | 'sun[:ABS:REL]' | 'topk:K[:STAT]' -> a detection rule."""
    from ditf.massive.detect import RatioRule, SunRule, TopKRule

    name, *values = text.split(":")
    try:
        if name == "ratio" and len(values) <= 1:
            return RatioRule(*(float(v) for v in values))
        if name == "sun" and len(values) in (0, 2):
            return SunRule(*(float(v) for v in values))
        if name == "topk" and len(values) in (1, 2):
            return TopKRule(int(values[0]), *values[1:])
    except ValueError as err:
        raise InvalidArgumentError(f"--rule {text!r}: the numbers after ':' are not valid.") from err
    raise InvalidArgumentError(f"--rule {text!r}; use ratio[:T], sun[:ABS:REL] or topk:K[:STAT] (e.g. topk:12).")


def run_scan(args: argparse.Namespace) -> int:
    """Write the scan report, statistics and figures to --output."""
    from ditf.features.preprocess import load_image
    from ditf.massive.scan import DEFAULT_RULES, scan

    if args.branch not in ("cond", "uncond"):
        raise InvalidArgumentError(f"--branch {args.branch!r}; a scan records cond or uncond.")
    if args.image is not None:
        load_image(args.image)  # fail on a missing or corrupt file before loading a model
        if args.steps is not None or args.record_steps != "all":
            raise InvalidArgumentError("--steps and --record-steps apply to generation scans; an --image scan runs one forward.")
    elif args.resolution is not None or args.t is not None:
        raise InvalidArgumentError("--t and --resolution apply to --image scans (t applies to single-image scans); a "
                                   "generation scan follows the sampler's schedule at --height/--width.")
    rules = [parse_rule(text) for text in args.rule] if args.rule else list(DEFAULT_RULES)
    pipe, preset = load_pipeline(args)
    result = scan(pipe, prompt=args.prompt, image=args.image, t=args.t, num_inference_steps=args.steps,
                  blocks=args.blocks, steps=args.record_steps, branch=args.branch, seed=args.seed, height=args.height,
                  width=args.width, resolution=args.resolution, guidance_scale=args.guidance, rules=rules,
                  plot_blocks=args.plot_blocks, out_dir=args.output, preset=preset)
    print(f"wrote {result.files['markdown']}, {result.files['json']} and {len(result.files['figures'])} figure files")
    return 0


def generation_actions(args: argparse.Namespace) -> list[Any]:
    """The disruption and Detail Guidance actions the options describe (errors for options given alone)."""
    from ditf.massive.guidance import DetailGuidance
    from ditf.massive import Edit, parse_op

    actions: list[Any] = []
    if args.disrupt:
        for spec in args.disrupt:
            channels, _, blocks = spec.rpartition("@") if "@" in spec else (spec, "", "all")
            if not channels or not blocks:
                raise InvalidArgumentError(f"--disrupt {spec!r}; use CHANNELS@BLOCKS such as auto@all or 154,1446@0-18.")
            actions.append(Edit(parse_op(args.op or "zero"), channels, blocks=blocks, steps=args.disrupt_steps or "all",
                                branch=args.disrupt_branch or "all"))
    else:
        _only_with(args, "--disrupt", op="--op", disrupt_steps="--disrupt-steps", disrupt_branch="--disrupt-branch")
    if (args.detail_guidance is None) != (args.dg_layer is None):
        raise InvalidArgumentError("--detail-guidance W and --dg-layer M go together: pass both (the paper publishes neither).")
    if args.detail_guidance is not None:
        actions.append(DetailGuidance(args.dg_layer, args.detail_guidance, steps=args.dg_steps or "all",
                                      channels=args.dg_channels or "auto", op=args.dg_op or "zero",
                                      cfg_scale=args.dg_cfg_scale))
    else:
        _only_with(args, "--detail-guidance", dg_steps="--dg-steps", dg_channels="--dg-channels", dg_op="--dg-op",
                   dg_cfg_scale="--dg-cfg-scale")
    return actions


def _only_with(args: argparse.Namespace, needed: str, **options: str) -> None:
    given = [flag for name, flag in options.items() if getattr(args, name) is not None]
    if given:
        raise InvalidArgumentError(f"{', '.join(given)} only apply together with {needed}; add {needed} or drop them.")


def run_generate(args: argparse.Namespace) -> int:
    """Write the image to --output and the record of every intervention next to it (.json)."""
    from ditf.massive.generate import TransportPlan, generate, save_generation

    actions = generation_actions(args)
    plan = None
    if args.transport_from is not None:
        plan = TransportPlan(args.transport_from, blocks=args.transport_layers or "all",
                             steps=args.transport_steps or "all",
                             channels=None if args.transport_channels == "all" else args.transport_channels or "auto",
                             spatial="cluster" if args.transport_mask == "cluster" else None)
    else:
        _only_with(args, "--transport-from", transport_layers="--transport-layers", transport_steps="--transport-steps",
                   transport_channels="--transport-channels", transport_mask="--transport-mask")
    pipe, _ = load_pipeline(args)
    result = generate(pipe, args.prompt, actions=actions, transport=plan, seed=args.seed, num_inference_steps=args.steps,
                      height=args.height, width=args.width, guidance_scale=args.guidance)
    result.record["model"] = args.model
    paths = save_generation(result, args.output)
    print(f"wrote {paths['image']} and {paths['record']}")
    return 0
