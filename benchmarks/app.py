"""Benchmark: latency of `ditf app`'s click callback on cached features.

Run by hand (never in CI):

    .venv/bin/python benchmarks/app.py                       # C=3072, 32x32 maps, 512x512 images
    .venv/bin/python benchmarks/app.py --targets 3 --threads 1

Times `ditf.app.callbacks.click` — the function the page calls when the source image is clicked — with
features already in the app's store (synthetic, seeded-random 3072-channel maps), so no model runs. The
first click of a target also prepares it (`prepare_target`), which later clicks reuse; both are reported. Each click is at a different source pixel. Prints the median and the 90th percentile of
the warm clicks against the 100 ms target; the gradio side (encoding the pictures, the round trip to
the browser) is not included.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ditf.app import callbacks
from ditf.app.store import FeatureStore, ModelLoader

TARGET_MS = 100.0
CONTROLS = {"block": 28, "t": 261, "ensemble": 8, "resolution": 512}


class NoModel(ModelLoader):
    """The benchmark's model is a folder of nothing: loading it is a bug (the features are in the store)."""

    def load(self, model: str, block: int):
        raise AssertionError("the benchmark must not load a model: features are seeded in the store")


def write_image(path: Path, size: int, seed: int) -> str:
    """A seeded random RGB image of size x size pixels, saved as PNG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=3072)
    parser.add_argument("--grid", type=int, default=32, help="feature map side (h = w)")
    parser.add_argument("--image", type=int, default=512, help="image side in pixels (source and targets)")
    parser.add_argument("--targets", type=int, default=1)
    parser.add_argument("--clicks", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    store = FeatureStore(NoModel("cpu"))
    generator = torch.Generator().manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as folder:
        model = str(Path(folder) / "synthetic-model")
        Path(model).mkdir()
        settings = store.settings(model, "ditf", **CONTROLS)
        paths = [write_image(Path(folder) / f"image{i}.png", args.image, args.seed + i) for i in range(args.targets + 1)]
        for path in paths:
            feats = torch.randn(args.channels, args.grid, args.grid, generator=generator)
            store.put_features(store.image(path), settings, feats)
        source, targets = paths[0], [(path, None) for path in paths[1:]]
        rng = np.random.default_rng(args.seed)

        def one_click() -> float:
            point = [int(v) for v in rng.integers(0, args.image, 2)]
            start = time.perf_counter()
            view = callbacks.click(store, source, targets, point, model, **CONTROLS, variant="ditf")
            elapsed = (time.perf_counter() - start) * 1000.0
            if view.error:
                raise SystemExit(view.status)
            return elapsed

        first = one_click()
        warm = [one_click() for _ in range(args.clicks)]
    median = statistics.median(warm)
    p90 = sorted(warm)[int(0.9 * (len(warm) - 1))]
    print(f"C={args.channels}, maps {args.grid}x{args.grid}, images {args.image}x{args.image}, "
          f"{args.targets} target(s), {args.threads} threads, {args.clicks} clicks")
    print(f"  first click (prepares the targets): {first:8.1f} ms")
    print(f"  later clicks: median {median:8.1f} ms, p90 {p90:8.1f} ms  (target < {TARGET_MS:.0f} ms)  "
          f"{'OK' if median < TARGET_MS else 'MISSED'}")
    if store.counters.extractions or store.counters.model_loads:
        raise SystemExit("a model ran: the store was bypassed")


if __name__ == "__main__":
    main()
