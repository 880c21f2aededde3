"""Benchmark: DiTF feature extraction, ours vs a naive extractor vs the DiTF authors' procedure.

Run by hand (never in CI); about 5-10 minutes on a 2-core CPU:

    .venv/bin/python benchmarks/extract.py
    .venv/bin/python benchmarks/extract.py --ensemble 4 --resolution 128 --repeats 2

The model is a random-weight FLUX.1 transformer of the real width (3072, 24 heads, T5 width 4096) with
reduced depth, chosen so that the blocks up to the tapped block k hold the same share of the parameters
as FLUX.1-dev's blocks 0..28 (7.9B of 11.9B, DiTF's k=28). It is written in bf16 with a small VAE as a
pipeline folder (no text encoders: every mode gets the same `prompt_embeds`), then each mode loads it
in a fresh subprocess and extracts features of one image:

- naive:   whole transformer loaded; a forward hook records block k's input while the full forward runs
           (later blocks and the final layer too); the VAE encodes every ensemble member separately.
- authors: whole transformer loaded; the forward stops after block k's input is read; the VAE encodes the
           image replicated E times in one batch (the authors' `eval_spair.py` procedure).
- ours:    `DiTFeaturizer.from_pretrained(folder, block=k)`: only blocks 0..k are read; the forward stops
           at block k; one VAE encoder pass, E posterior samples.

Each mode reports load and extraction wall time, CPU time (less sensitive to other load on the machine),
and peak resident memory (VmHWM) above the worker's baseline after imports. The best of `--repeats`
runs is kept per mode; modes are interleaved so that background load hits them alike.
"""

from __future__ import annotations

import argparse
import json
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
MODES = ("naive", "authors", "ours")
TARGETS = {"faster than naive": 1.4, "not slower than the authors": 1.0, "memory vs whole transformer": 0.7}


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


class Clock:
    """Wall and CPU seconds of a `with` block."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def worker(args: argparse.Namespace) -> None:
    """Load and extract in one mode; print a JSON line with timings and memory, save the features."""
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
    if args.worker == "ours":
        with Clock() as load:
            fx = DiTFeaturizer.from_pretrained(str(folder), block=args.block, torch_dtype=dtype, device="cpu")
        loaded_mb = peak_rss_mb() - baseline
        with Clock() as extract, torch.no_grad():
            features = fx(image, t=T, block=args.block, ensemble=args.ensemble, resolution=args.resolution,
                          discard=None, progress=False, **cond)[0]
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
                      "loaded_mb": loaded_mb, "peak_mb": peak_rss_mb() - baseline, "baseline_mb": baseline,
                      "params": params}))


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
               "--seed", str(args.seed), "--dtype", args.dtype]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"worker {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def best_of(runs: list[dict]) -> dict:
    """Per quantity, the best (smallest) value over repeated runs of one mode."""
    return {key: min(run[key] for run in runs) for key in runs[0]}


def report(results: dict[str, dict], split: DepthSplit, target_share: float, folder: Path, args: argparse.Namespace) -> None:
    from safetensors.torch import load_file

    print(f"\nFLUX width 3072, {split.double} double + {split.single} single blocks, tap k={split.block}: "
          f"blocks 0..k hold {split.loaded_params / 1e9:.3f}B of {split.total_params / 1e9:.3f}B parameters "
          f"({split.ratio:.3f}; FLUX.1-dev at k=28: {target_share:.3f}).")
    tokens = (args.resolution // 16) ** 2
    print(f"{args.dtype} on CPU (bf16 checkpoint), {args.threads} threads; image {args.resolution}px ({tokens} image tokens) + {args.text_tokens} "
          f"text tokens, ensemble {args.ensemble}, t={T}; best of {args.repeats} run(s).\n")
    header = f"{'mode':8} {'load s':>7} {'extract s':>10} {'extract cpu s':>14} {'total s':>8} {'peak MB':>8} {'params':>8}"
    print(header)
    print("-" * len(header))
    for mode in MODES:
        r = results[mode]
        print(f"{mode:8} {r['load_s']:7.1f} {r['extract_s']:10.1f} {r['extract_cpu_s']:14.1f} "
              f"{r['load_s'] + r['extract_s']:8.1f} {r['peak_mb']:8.0f} {r['params'] / 1e9:7.3f}B")
    ours, naive, authors = results["ours"], results["naive"], results["authors"]
    total = lambda r: r["load_s"] + r["extract_s"]
    checks = [
        ("faster than naive (extract cpu)", naive["extract_cpu_s"] / ours["extract_cpu_s"], ">=", TARGETS["faster than naive"]),
        ("faster than naive (total wall)", total(naive) / total(ours), ">=", TARGETS["faster than naive"]),
        ("vs authors (extract cpu)", authors["extract_cpu_s"] / ours["extract_cpu_s"], ">=", TARGETS["not slower than the authors"]),
        ("vs authors (total wall)", total(authors) / total(ours), ">=", TARGETS["not slower than the authors"]),
        ("peak memory / whole model (naive)", ours["peak_mb"] / naive["peak_mb"], "<=", TARGETS["memory vs whole transformer"]),
    ]
    print("\nratio                                  value  target   met")
    for name, value, op, target in checks:
        met = value >= target if op == ">=" else value <= target
        print(f"{name:36} {value:7.2f}  {op}{target:<5} {'yes' if met else 'NO'}")
    print(f"{'peak memory / authors (no target)':36} {ours['peak_mb'] / authors['peak_mb']:7.2f}  (with a lazily mapped "
          "checkpoint in the compute dtype, weights a forward never touches cost no RAM on CPU; they do once "
          "copied: --dtype float32 or a GPU)")
    feats = {mode: load_file(folder / f"features_{mode}.safetensors")["features"] for mode in MODES}
    print("\nagreement of the features (mean per-cell cosine after removing each channel's mean, which holds the "
          "AdaLN shift; modes differ only by their noise draws):")
    print("  " + ", ".join(f"{a}-{b} {centred_cosine(feats[a], feats[b]):.4f}"
                           for a, b in (("ours", "authors"), ("ours", "naive"), ("authors", "naive"))))


def centred_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over cells of the cosine between (C, h, w) maps, each channel centred over the cells first."""
    centre = lambda x: x.flatten(1) - x.flatten(1).mean(dim=1, keepdim=True)
    return torch.nn.functional.cosine_similarity(centre(a), centre(b), dim=0).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ensemble", type=int, default=8, help="noise draws per image (DiTF: 8)")
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels (multiple of 16)")
    parser.add_argument("--text-tokens", type=int, default=512, help="T5 tokens (DiTF pads to 512)")
    parser.add_argument("--max-blocks", type=int, default=8, help="most blocks the reduced model may have")
    parser.add_argument("--max-params", type=float, default=1.6e9, help="most parameters the reduced model may have")
    parser.add_argument("--repeats", type=int, default=1)
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
    with tempfile.TemporaryDirectory(prefix="ditf-bench-") as tmp:
        folder = (args.keep or Path(tmp)) / "flux_reduced"
        start = time.perf_counter()
        write_pipeline(folder, split, args.seed)
        write_inputs(folder, args)
        print(f"wrote a {split.total_params / 1e9:.2f}B-parameter bf16 checkpoint in {time.perf_counter() - start:.0f} s: {folder}")
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for repeat in range(args.repeats):
            for mode in MODES:
                runs[mode].append(run_worker(mode, folder, args))
                print(f"  run {repeat + 1} {mode}: {json.dumps({k: round(v, 2) for k, v in runs[mode][-1].items()})}", flush=True)
        report({mode: best_of(r) for mode, r in runs.items()}, split, target_share, folder, args)
        print(json.dumps({"split": asdict(split), "results": {mode: best_of(r) for mode, r in runs.items()}}))


if __name__ == "__main__":
    main()
