"""`ditf massive scan | disrupt | guide | transport`: thin wrappers over `ditf.massive`.

Every command selects blocks with `--blocks` and denoising steps with `--steps`; `--num-inference-steps`,
`--height`, `--width` and `--guidance-scale` go to the diffusers pipeline call. The interventions can be
combined in Python (`ditf.massive.generate(pipe, prompt, actions=[...], transport=...)`).
"""

from __future__ import annotations

import argparse
from typing import Any

from ditf.cli.common import HelpFormatter, check_exclusive, device_of
from ditf.cli.outputs import IMAGE_SUFFIXES, check_output_file, check_output_folder
from ditf.errors import InvalidArgumentError
from ditf.settings import DTYPES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `massive` and its sub-commands."""
    massive = subparsers.add_parser("massive", help="massive-activation analysis and interventions",
                                    description="See, measure and steer the massive activations of a DiT.")
    commands = massive.add_subparsers(dest="massive_command", required=True)

    scan = commands.add_parser("scan", formatter_class=HelpFormatter,
                               help="record a generation (or one noised image) and report massive activations")
    scan.add_argument("--prompt", default="", help="prompt to generate (or to condition the image forward on)")
    scan.add_argument("--image", help="scan one image noised to --t instead of a generation")
    scan.add_argument("--t", type=float, help="timestep 0..1000 for --image (DiTF: 261)")
    scan.add_argument("--resolution", type=int, help="long side for --image (default: the model's preset)")
    scan.add_argument("--guidance", type=float, help="embedded guidance for --image (FLUX.1-dev, FLUX.2-dev)")
    scan.add_argument("--blocks", default="all", help="blocks to record: all, last, 5-20, 3,7")
    scan.add_argument("--steps", default="all", help="denoising steps to record: all, last, 0-3")
    scan.add_argument("--branch", default="cond", choices=["cond", "uncond"], help="CFG branch to record")
    scan.add_argument("--rule", action="append", default=None,
                      help="detection rule, repeatable: ratio[:T], sun[:ABS:REL], topk:K[:STAT] (default: ratio, sun)")
    scan.add_argument("--plot-blocks", help="blocks with full-tensor figures (default: 4 spread over --blocks)")
    _add_generation_args(scan)
    scan.add_argument("-o", "--output", required=True, help="output folder for the report, statistics and figures")
    scan.set_defaults(func=run_scan)

    disrupt = commands.add_parser("disrupt", formatter_class=HelpFormatter,
                                  help="generate while changing massive channels (Sun et al., Turri et al.)")
    disrupt.add_argument("--channels", default="auto",
                         help="auto, 154,1446, bottom:K, random:K, matched (controls with the same count)")
    disrupt.add_argument("--op", default="zero", help="zero, mean, const:V, scale:R or clamp:V")
    _add_scope_args(disrupt, branch="all")
    _add_generation_args(disrupt, prompt=True)
    _add_image_output(disrupt)
    disrupt.set_defaults(func=run_disrupt)

    guide = commands.add_parser("guide", formatter_class=HelpFormatter,
                                help="Detail Guidance (Gan et al. 2025): D + w (D - D_m); m, w, the window unpublished")
    guide.add_argument("--weight", type=float, required=True, help="the DG scale w")
    guide.add_argument("--channels", default="auto", help="massive channels at block m: auto, 154,1446, ...")
    guide.add_argument("--op", default="zero", help="the disruption of block m: zero, scale:R, ...")
    guide.add_argument("--cfg-scale", type=float,
                       help="the pipeline's CFG scale g when it runs CFG (the DG term is divided by g)")
    _add_scope_args(guide, branch=None, blocks_help="the block m whose massive channels are disrupted (one block)")
    _add_generation_args(guide, prompt=True)
    _add_image_output(guide)
    guide.set_defaults(func=run_guide)

    transport = commands.add_parser("transport", formatter_class=HelpFormatter,
                                    help="activation transport (Turri et al. 2026) from another prompt's trajectory")
    transport.add_argument("--source-prompt", required=True, help="prompt whose trajectory the channels come from")
    transport.add_argument("--channels", default="auto", help="channels m: auto, all, 11,42, ...")
    transport.add_argument("--mask", choices=["none", "cluster"], default="none",
                           help="spatial mask p: every token, or the K-means foreground on the MA channels")
    _add_scope_args(transport, branch="all")
    _add_generation_args(transport, prompt=True)
    _add_image_output(transport)
    transport.set_defaults(func=run_transport)


def _add_scope_args(parser: argparse.ArgumentParser, *, branch: str | None,
                    blocks_help: str = "blocks to act on: all, last, 5-20, 3,7") -> None:
    group = parser.add_argument_group("where")
    group.add_argument("--blocks", required=True, help=blocks_help)
    group.add_argument("--steps", default="all", help="denoising steps to act on: all, last, 0-10, ...")
    if branch is not None:
        group.add_argument("--branch", default=branch, choices=["all", "cond", "uncond"], help="CFG branch to act on")


def _add_generation_args(parser: argparse.ArgumentParser, *, prompt: bool = False) -> None:
    group = parser.add_argument_group("model and sampling")
    if prompt:
        group.add_argument("--prompt", required=True, help="prompt to generate")
    group.add_argument("--model", required=True, help="preset alias (e.g. flux-dev), hub id or local pipeline folder")
    group.add_argument("--seed", type=int, default=0, help="generator seed")
    group.add_argument("--num-inference-steps", type=int, help="denoising steps (default: the pipeline's)")
    group.add_argument("--height", type=int, help="image height in pixels (default: the pipeline's)")
    group.add_argument("--width", type=int, help="image width in pixels (default: the pipeline's)")
    group.add_argument("--guidance-scale", type=float, help="the pipeline's guidance_scale (default: its own)")
    group.add_argument("--dtype", choices=list(DTYPES), help="weights dtype (default: bf16 on CUDA, fp32 elsewhere)")
    group.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    group.add_argument("--offload", choices=["model", "sequential"],
                       help="keep weights on the CPU and move them to the device when used (diffusers offload)")


def _add_image_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, help="image file (.png); the record goes next to it (.json)")


def check_generation_args(args: argparse.Namespace) -> None:
    """The sampling options, before any model loads."""
    from ditf.massive.generate import pipeline_settings

    pipeline_settings(args.num_inference_steps, args.height, args.width, args.guidance_scale)


def load_pipeline(args: argparse.Namespace) -> tuple[Any, Any]:
    """Load the full diffusers pipeline of --model on --device (or offloaded); return (pipeline, preset)."""
    from ditf.cli.common import quiet_loading
    from ditf.features.featurizer import check_dtype_on_device
    from ditf.loading import check_model, load_components
    from ditf.settings import torch_dtype

    import torch

    check_generation_args(args)
    check_model(args.model, needs=("transformer", "vae"))
    device = torch.device(device_of(args))
    quiet_loading()
    dtype = torch_dtype(args.dtype, str(device))
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

    check_output_folder(args.output, "--output")
    if args.image is not None:
        load_image(args.image)  # fail on a missing or corrupt file before loading a model
        if args.num_inference_steps is not None or args.steps != "all":
            raise InvalidArgumentError("--num-inference-steps and --steps apply to generation scans; an --image scan "
                                       "runs one forward.")
    else:
        check_exclusive(args, "--image", t="--t", resolution="--resolution", guidance="--guidance")
    rules = [parse_rule(text) for text in args.rule] if args.rule else list(DEFAULT_RULES)
    pipe, preset = load_pipeline(args)
    result = scan(pipe, prompt=args.prompt, image=args.image, t=args.t, num_inference_steps=args.num_inference_steps,
                  blocks=args.blocks, steps=args.steps, branch=args.branch, seed=args.seed, height=args.height,
                  width=args.width, resolution=args.resolution, guidance=args.guidance,
                  guidance_scale=args.guidance_scale, rules=rules, plot_blocks=args.plot_blocks, out_dir=args.output,
                  preset=preset, model=args.model)
    print(f"wrote {result.files['markdown']}, {result.files['json']} and {len(result.files['figures'])} figure files")
    return 0


def run_disrupt(args: argparse.Namespace) -> int:
    """Generate while editing the chosen channels; write the image and the record of every edit."""
    from ditf.massive import Edit, parse_op

    action = Edit(parse_op(args.op), args.channels, blocks=args.blocks, steps=args.steps, branch=args.branch)
    return _generate(args, actions=[action])


def run_guide(args: argparse.Namespace) -> int:
    """Generate with Detail Guidance at block --blocks (one block m)."""
    from ditf.massive.guidance import DetailGuidance
    from ditf.massive.scopes import parse_indices

    blocks = parse_indices(args.blocks, "--blocks")
    if len(blocks) != 1:
        raise InvalidArgumentError(f"--blocks {args.blocks!r}: Detail Guidance disrupts one block m; pass one index.")
    action = DetailGuidance(blocks[0], args.weight, steps=args.steps, channels=args.channels, op=args.op,
                            cfg_scale=args.cfg_scale)
    return _generate(args, actions=[action])


def run_transport(args: argparse.Namespace) -> int:
    """Generate with the MA channels of --source-prompt's trajectory transported into this one."""
    from ditf.massive.generate import TransportPlan

    plan = TransportPlan(args.source_prompt, blocks=args.blocks, steps=args.steps,
                         channels=None if args.channels == "all" else args.channels,
                         spatial="cluster" if args.mask == "cluster" else None, branch=args.branch)
    return _generate(args, transport=plan)


def _generate(args: argparse.Namespace, actions: list[Any] = (), transport: Any = None) -> int:
    from ditf.massive.generate import generate, save_generation

    check_output_file(args.output, "--output", IMAGE_SUFFIXES)
    pipe, _ = load_pipeline(args)
    result = generate(pipe, args.prompt, actions=list(actions), transport=transport, seed=args.seed,
                      num_inference_steps=args.num_inference_steps, height=args.height, width=args.width,
                      guidance_scale=args.guidance_scale)
    result.record["model"] = args.model
    paths = save_generation(result, args.output)
    print(f"wrote {paths['image']} and {paths['record']}")
    return 0
