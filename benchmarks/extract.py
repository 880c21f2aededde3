"""Benchmark: DiTF feature extraction, ours vs a naive extractor vs the DiTF authors' procedure, and
several blocks from one forward pass vs the deepest block alone.

Run by hand (never in CI); about 5 minutes on 2 idle cores with the defaults (3 rounds of all modes):

    .venv/bin/python benchmarks/extract.py
    .venv/bin/python benchmarks/extract.py --modes ours,ours-multi --ensemble 4 --resolution 128
    .venv/bin/python benchmarks/extract.py --dtype float32 --repeats 1

The model is a random-weight FLUX.1 transformer of the real width (3072, 24 heads, T5 width 4096) with
reduced depth, chosen so that the blocks up to the tapped block k hold the same share of the parameters
as FLUX.1-dev's blocks 0..28 (7.9B of 11.9B, DiTF's k=28). It is written in bf16 with a small VAE as a
pipeline folder (no text encoders: every mode gets the same `prompt_embeds`), then each mode loads it
in a fresh subprocess and extracts features of one image:

- naive:      whole transformer loaded; a forward hook records block k's input while the full forward runs
              (later blocks and the final layer too); the VAE encodes every ensemble member separately.
- authors:    whole transformer loaded; the forward stops after block k's input is read; the VAE encodes the
              image replicated E times in one batch (the authors' `eval_spair.py` procedure).
- ours:       `DiTFeaturizer.from_pretrained(folder, block=k)`: only blocks 0..k are read; the forward stops
              at block k; one VAE encoder pass, E posterior samples.
- ours-multi: as ours (same partial load to k), but `fx(image, block=[k-B+1, ..., k])`: B blocks' features from
              the same single forward pass (`--multi-blocks` B).

Each run reports load and extraction wall time, CPU time, the other processes' CPU use during extraction
(busy cores from /proc/stat minus the worker's own CPU: the background load the run shared the machine
with), and peak resident memory (VmHWM) above the worker's baseline after imports.

`--repeats` rounds run every selected mode once each; the order rotates from round to round, so that no mode
always runs first (or right after the slowest). Per mode the tables give the median over rounds of each
quantity. The ratios (authors / ours, naive / ours, ours-multi / ours, memory) are computed within each round,
where the modes ran minutes apart under similar load, and are printed as their median and range.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

FLUX_DEV_WIDTH = dict(attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                      pooled_projection_dim=768, in_channels=64, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
"""FLUX.1-dev's transformer config apart from its depth (19 double + 38 single blocks)."""
FLUX_DEV_DEPTH = (19, 38)
DITF_BLOCK = 28
"""DiTF's block for FLUX.1-dev (single block 9)."""
T = 261
MODES = ("naive", "authors", "ours", "ours-multi")
TARGETS = {"faster than naive": 1.4, "not slower than the authors": 1.0, "memory vs whole transformer": 0.7,
           "several blocks vs the deepest alone": 1.15}


@dataclass(frozen=True)
class DepthSplit:
    """A reduced FLUX depth: `double` + `single` blocks, tapped at global block `block`."""

    double: int
    single: int
    block: int
    loaded_params: int
    total_params: int

    @property
    def ratio(self) -> float:
        return self.loaded_params / self.total_params


def block_param_counts() -> tuple[int, int, int]:
    """Parameters of one double block, one single block, and of everything else, at FLUX.1-dev width."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, **FLUX_DEV_WIDTH)
    count = lambda module: sum(p.numel() for p in module.parameters())
    double, single = count(model.transformer_blocks[0]), count(model.single_transformer_blocks[0])
    return double, single, count(model) - double - single


def choose_depth(max_blocks: int, max_params: float) -> tuple[DepthSplit, float]:
    """The reduced depth whose loaded share at its tap is closest to FLUX.1-dev's at k=28.

    Candidates tap a single-stream block (as DiTF does) and hold at most `max_blocks` blocks and
    `max_params` parameters. Returns the split and FLUX.1-dev's share.
    """
    double, single, rest = block_param_counts()

    def params(n_double: int, n_single: int) -> int:
        return n_double * double + n_single * single + rest

    target = params(FLUX_DEV_DEPTH[0], DITF_BLOCK - FLUX_DEV_DEPTH[0] + 1) / params(*FLUX_DEV_DEPTH)
    candidates = []
    for n_double in range(1, max_blocks):
        for n_single in range(1, max_blocks - n_double + 1):
            total = params(n_double, n_single)
            if total > max_params:
                continue
            for tapped in range(n_single - 1):  # leave at least one single block after the tap
                loaded = params(n_double, tapped + 1)
                candidates.append(DepthSplit(n_double, n_single, n_double + tapped, loaded, total))
    best = min(candidates, key=lambda s: (abs(s.ratio - target), s.total_params))
    return best, target


# ------------------------------------------------------------------ the checkpoint
def write_pipeline(folder: Path, split: DepthSplit, seed: int) -> None:
    """A FLUX pipeline folder: random bf16 transformer of `split` depth, a small VAE, a scheduler."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from safetensors.torch import save_file

    with init_empty_weights():
        transformer = FluxTransformer2DModel(num_layers=split.double, num_single_layers=split.single, **FLUX_DEV_WIDTH)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, meta in transformer.state_dict().items():
        if meta.ndim >= 2:  # weights ~ N(0, 1/fan_in) keep activations in range through the blocks
            state[name] = (torch.randn(meta.shape, generator=generator) * meta.shape[1] ** -0.5).to(torch.bfloat16)
        elif name.endswith("bias"):
            state[name] = (torch.randn(meta.shape, generator=generator) * 0.02).to(torch.bfloat16)
        else:
            state[name] = torch.ones(meta.shape, dtype=torch.bfloat16)
    (folder / "transformer").mkdir(parents=True)
    transformer.save_config(folder / "transformer")
    save_file(state, folder / "transformer" / "diffusion_pytorch_model.safetensors")
    del state
    torch.manual_seed(seed)
    vae = AutoencoderKL(latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 64, 64),
                        layers_per_block=1, norm_num_groups=32, shift_factor=0.1159, scaling_factor=0.3611)
    vae.to(torch.bfloat16).save_pretrained(folder / "vae")
    FlowMatchEulerDiscreteScheduler().save_pretrained(folder / "scheduler")
    none = [None, None]
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": none, "text_encoder_2": none, "tokenizer": none, "tokenizer_2": none,
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}))


def write_inputs(folder: Path, args: argparse.Namespace) -> None:
    """One random image and random T5 / CLIP prompt embeddings, shared by every mode."""
    from safetensors.torch import save_file

    rng = np.random.default_rng(args.seed)
    image = torch.from_numpy((rng.random((args.resolution, args.resolution, 3)) * 255).astype(np.uint8))
    generator = torch.Generator().manual_seed(args.seed)
    save_file({"image": image, "prompt_embeds": torch.randn(1, args.text_tokens, 4096, generator=generator),
               "pooled_prompt_embeds": torch.randn(1, 768, generator=generator)}, folder / "inputs.safetensors")


# ------------------------------------------------------------------ one mode in a fresh process
def peak_rss_mb() -> float:
    """High-water mark of this process' resident memory in MB.

    Read from /proc/self/status (VmHWM, reset by exec): `ru_maxrss` would also count the parent's memory
    at the time it forked this worker.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine_busy_s() -> float:
    """CPU seconds all processes have spent busy since boot, summed over cores (/proc/stat; 0 elsewhere)."""
    stat = Path("/proc/stat")
    if not stat.is_file():
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in stat.read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Clock:
    """Wall and CPU seconds of a `with` block, and `others`: the cores other processes kept busy meanwhile
    (machine busy seconds minus this process' CPU seconds, over the wall time; 0 on an otherwise idle machine)."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu, self.others = time.perf_counter(), time.process_time(), machine_busy_s()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        self.others = max(machine_busy_s() - self.others - self.cpu, 0.0) / max(self.wall, 1e-9)


def worker(args: argparse.Namespace) -> None:
    """Load and extract in one mode; print a JSON line with timings and memory, save block k's features."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from safetensors.torch import load_file, save_file

    from ditf import DiTFeaturizer
    from ditf.arch.flux import FluxArch
    from ditf.features.preprocess import prepare_image

    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    inputs = load_file(folder / "inputs.safetensors")
    image = inputs["image"].numpy()
    cond = {"prompt_embeds": inputs["prompt_embeds"], "pooled_prompt_embeds": inputs["pooled_prompt_embeds"]}
    baseline = peak_rss_mb()
    dtype = getattr(torch, args.dtype)
    if args.worker.startswith("ours"):
        with Clock() as load:
            fx = DiTFeaturizer.from_pretrained(str(folder), block=args.block, torch_dtype=dtype, device="cpu")
        loaded_mb = peak_rss_mb() - baseline
        blocks = tapped_blocks(args)
        with Clock() as extract, torch.no_grad():
            features = fx(image, t=T, block=blocks if len(blocks) > 1 else args.block, ensemble=args.ensemble,
                          resolution=args.resolution, discard=None, progress=False, **cond)[0]
        if len(blocks) > 1:
            features = features[args.block]
        params = sum(p.numel() for p in fx.transformer.parameters())
    else:
        with Clock() as load:
            transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype).eval()
            vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype).eval()
        loaded_mb = peak_rss_mb() - baseline
        arch = FluxArch(transformer, vae)
        with Clock() as extract, torch.no_grad():
            pixels = prepare_image(image, arch.stride, resolution=args.resolution).pixels.to(dtype)
            features = baseline_features(arch, pixels, cond, args, stop=args.worker == "authors",
                                         separate_vae_passes=args.worker == "naive")
        params = sum(p.numel() for p in transformer.parameters())
    save_file({"features": features.contiguous()}, folder / f"features_{args.worker}.safetensors")
    print(json.dumps({"load_s": load.wall, "load_cpu_s": load.cpu, "extract_s": extract.wall, "extract_cpu_s": extract.cpu,
                      "extract_others": extract.others, "loaded_mb": loaded_mb, "peak_mb": peak_rss_mb() - baseline,
                      "baseline_mb": baseline, "params": params}))


def tapped_blocks(args: argparse.Namespace) -> list[int]:
    """The blocks a mode taps: k alone, or for ours-multi the `--multi-blocks` blocks ending at k."""
    if args.worker != "ours-multi":
        return [args.block]
    return list(range(args.block - args.multi_blocks + 1, args.block + 1))


def baseline_features(arch, pixels: torch.Tensor, cond: dict, args: argparse.Namespace, *, stop: bool,
                      separate_vae_passes: bool) -> torch.Tensor:
    """DiTF features (C, h, w) the straightforward way: E VAE encoder passes, block k's input read by a hook.

    `stop` ends the forward at block k (the authors' procedure); otherwise the whole model runs (naive).
    """
    from ditf.features.postprocess import ditf_features

    generator = torch.Generator().manual_seed(args.seed)
    if separate_vae_passes:
        raw_latents = torch.cat([arch.vae.encode(pixels).latent_dist.sample(generator) for _ in range(args.ensemble)])
    else:
        raw_latents = arch.vae.encode(pixels.expand(args.ensemble, -1, -1, -1)).latent_dist.sample(generator)
    latents = arch.normalize_latents(raw_latents.float())
    noise = torch.randn(latents.shape, generator=generator)
    noisy = arch.noise_latents(latents, noise, T).to(arch.transformer.dtype)
    block = arch.block(args.block)
    captured = {}

    class Stop(Exception):
        pass

    def hook(module, hook_args, kwargs):
        captured["inputs"] = arch.read_block_inputs(block, hook_args, kwargs)
        if stop:
            raise Stop

    handle = block.module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        arch.run(noisy, T, cond)
    except Stop:
        pass
    finally:
        handle.remove()
    inputs = captured["inputs"]
    raw = inputs.image.float().mean(dim=0)
    feats = ditf_features(raw, inputs.shift[0].float(), inputs.scale[0].float())
    h, w = arch.token_grid(tuple(latents.shape[-2:]))
    return feats.reshape(h, w, -1).permute(2, 0, 1)


# ------------------------------------------------------------------ driver
def run_worker(mode: str, folder: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", mode, "--folder", str(folder), "--block", str(args.block),
               "--ensemble", str(args.ensemble), "--resolution", str(args.resolution), "--threads", str(args.threads),
               "--seed", str(args.seed), "--dtype", args.dtype, "--multi-blocks", str(args.multi_blocks)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"worker {mode} failed:\n{done.stderr[-3000:]}")
    run = json.loads(done.stdout.strip().splitlines()[-1])
    run["total_s"], run["total_cpu_s"] = run["load_s"] + run["extract_s"], run["load_cpu_s"] + run["extract_cpu_s"]
    return run


def rotated(modes: list[str], round_index: int) -> list[str]:
    """The order of round `round_index`: the modes rotated by one place per round."""
    shift = round_index % len(modes)
    return modes[shift:] + modes[:shift]


def medians(runs: list[dict]) -> dict:
    """Per quantity, the median over the rounds of one mode."""
    return {key: float(np.median([run[key] for run in runs])) for key in runs[0]}


RATIOS = [  # (name, numerator mode, denominator mode, quantity, comparison, target)
    *[(f"authors / ours, {what}", "authors", "ours", key, ">=", TARGETS["not slower than the authors"])
      for what, key in (("extract wall", "extract_s"), ("extract CPU", "extract_cpu_s"), ("total wall", "total_s"),
                        ("total CPU", "total_cpu_s"))],
    *[(f"naive / ours, {what}", "naive", "ours", key, ">=", TARGETS["faster than naive"])
      for what, key in (("extract wall", "extract_s"), ("extract CPU", "extract_cpu_s"), ("total wall", "total_s"),
                        ("total CPU", "total_cpu_s"))],
    ("ours / naive, peak memory", "ours", "naive", "peak_mb", "<=", TARGETS["memory vs whole transformer"]),
    ("ours / authors, peak memory", "ours", "authors", "peak_mb", "", None),
    *[(f"ours-multi / ours, {what}", "ours-multi", "ours", key, "<=", TARGETS["several blocks vs the deepest alone"])
      for what, key in (("extract wall", "extract_s"), ("extract CPU", "extract_cpu_s"))],
]
"""The ratios reported, each computed within every round; the target is checked on their median."""


def round_ratios(rounds: list[dict[str, dict]]) -> dict[str, list[float]]:
    """Every applicable ratio of `RATIOS` in each round (both of its modes were run): name -> values per round."""
    return {name: [r[num][key] / r[den][key] for r in rounds]
            for name, num, den, key, _, _ in RATIOS if num in rounds[0] and den in rounds[0]}


def report(rounds: list[dict[str, dict]], split: DepthSplit, target_share: float, folder: Path,
           args: argparse.Namespace) -> dict[str, list[float]]:
    """Print the per-mode medians, the per-round ratios and the features' agreement; return the ratios."""
    modes = [mode for mode in MODES if mode in rounds[0]]
    print(f"\nFLUX width 3072, {split.double} double + {split.single} single blocks, tap k={split.block}: "
          f"blocks 0..k hold {split.loaded_params / 1e9:.3f}B of {split.total_params / 1e9:.3f}B parameters "
          f"({split.ratio:.3f}; FLUX.1-dev at k=28: {target_share:.3f}).")
    tokens = (args.resolution // 16) ** 2
    print(f"{args.dtype} on CPU (bf16 checkpoint), {args.threads} threads; image {args.resolution}px ({tokens} image tokens) "
          f"+ {args.text_tokens} text tokens, ensemble {args.ensemble}, t={T}; ours-multi taps {args.multi_blocks} "
          f"blocks; medians over {len(rounds)} round(s).\n")
    header = (f"{'mode':10} {'load s':>7} {'load cpu':>8} {'extract s':>9} {'extr cpu':>8} {'cpu/wall':>8} "
              f"{'others':>6} {'total s':>7} {'total cpu':>9} {'peak MB':>7} {'params':>7}")
    print(header)
    print("-" * len(header))
    for mode in modes:
        r = medians([one[mode] for one in rounds])
        print(f"{mode:10} {r['load_s']:7.1f} {r['load_cpu_s']:8.1f} {r['extract_s']:9.1f} {r['extract_cpu_s']:8.1f} "
              f"{r['extract_cpu_s'] / r['extract_s']:8.2f} {r['extract_others']:6.2f} {r['total_s']:7.1f} "
              f"{r['total_cpu_s']:9.1f} {r['peak_mb']:7.0f} {r['params'] / 1e9:6.3f}B")
    print("(cpu/wall: extraction's CPU over wall time, at most the thread count; others: cores kept busy by other "
          "processes during extraction)")
    ratios = round_ratios(rounds)
    targets = {name: (op, target) for name, _, _, _, op, target in RATIOS}
    print(f"\n{'ratio':34} {'median':>7} {'range':>13}  target  met")
    for name, values in ratios.items():
        value, (op, target) = float(np.median(values)), targets[name]
        met = "" if target is None else "yes" if (value >= target if op == ">=" else value <= target) else "NO"
        print(f"{name:34} {value:7.2f} {min(values):6.2f}-{max(values):<6.2f}  {op + str(target) if target else '':6}  {met}")
    print_agreement(modes, folder)
    return ratios


def print_agreement(modes: list[str], folder: Path) -> None:
    """The features of block k from each pair of modes: centred cosine (and, ours vs ours-multi, the largest difference)."""
    from safetensors.torch import load_file

    feats = {mode: load_file(folder / f"features_{mode}.safetensors")["features"] for mode in modes}
    pairs = [(a, b) for a, b in (("ours", "authors"), ("ours", "naive"), ("authors", "naive"), ("ours-multi", "ours"))
             if a in feats and b in feats]
    if not pairs:
        return
    print("\nagreement of block k's features (mean per-cell cosine after removing each channel's mean, which holds the "
          "AdaLN shift; ours, authors and naive differ only by their noise draws, ours-multi draws ours' noise):")
    print("  " + ", ".join(f"{a}-{b} {centred_cosine(feats[a], feats[b]):.4f}" for a, b in pairs))
    if ("ours-multi", "ours") in pairs:
        print(f"  ours-multi vs ours: largest difference {(feats['ours-multi'] - feats['ours']).abs().max().item():.3g}")


def centred_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over cells of the cosine between (C, h, w) maps, each channel centred over the cells first."""
    centre = lambda x: x.flatten(1) - x.flatten(1).mean(dim=1, keepdim=True)
    return torch.nn.functional.cosine_similarity(centre(a), centre(b), dim=0).mean().item()


def parse_modes(text: str) -> list[str]:
    """`--modes` "a,b,..." -> the modes in `MODES` order; unknown names are an error."""
    modes = [mode.strip() for mode in text.split(",") if mode.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    return [mode for mode in MODES if mode in modes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", type=parse_modes, default=list(MODES), help=f"comma-separated (default: {','.join(MODES)})")
    parser.add_argument("--ensemble", type=int, default=8, help="noise draws per image (DiTF: 8)")
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels (multiple of 16)")
    parser.add_argument("--text-tokens", type=int, default=512, help="T5 tokens (DiTF pads to 512)")
    parser.add_argument("--max-blocks", type=int, default=8, help="most blocks the reduced model may have")
    parser.add_argument("--max-params", type=float, default=1.6e9, help="most parameters the reduced model may have")
    parser.add_argument("--multi-blocks", type=int, default=4, help="blocks B that ours-multi taps, the deepest k")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of all modes (the order rotates per round)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="compute dtype; the checkpoint is bf16, so float32 makes every loaded weight a copy")
    parser.add_argument("--keep", type=Path, help="write the checkpoint here and keep it (default: a temp folder)")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--block", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    split, target_share = choose_depth(args.max_blocks, args.max_params)
    args.block = split.block
    if not 1 <= args.multi_blocks <= split.block + 1:
        parser.error(f"--multi-blocks must be 1..{split.block + 1} (blocks 0..k={split.block})")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="ditf-bench-") as tmp:
        folder = (args.keep or Path(tmp)) / "flux_reduced"
        start = time.perf_counter()
        write_pipeline(folder, split, args.seed)
        write_inputs(folder, args)
        print(f"wrote a {split.total_params / 1e9:.2f}B-parameter bf16 checkpoint in {time.perf_counter() - start:.0f} s: {folder}")
        rounds: list[dict[str, dict]] = []
        for index in range(args.repeats):
            rounds.append({})
            for mode in rotated(args.modes, index):
                rounds[-1][mode] = run_worker(mode, folder, args)
                shown = {k: round(v, 2) for k, v in rounds[-1][mode].items() if k not in ("baseline_mb", "params")}
                print(f"  round {index + 1} {mode}: {json.dumps(shown)}", flush=True)
        ratios = report(rounds, split, target_share, folder, args)
        print(f"\nload average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
              f"{time.perf_counter() - start:.0f} s in all")
        print(json.dumps({"split": asdict(split), "rounds": rounds, "ratios": ratios}))


if __name__ == "__main__":
    main()
