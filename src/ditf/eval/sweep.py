"""Sweep blocks and timesteps of a DiT on a correspondence benchmark: which (block, t) makes the best features.

For each timestep, every image of a seeded subset of pairs is extracted once for all the listed blocks (one
forward pass that stops after the deepest), and each block's map is stored in the feature cache under the
same key a single-block run would use. So an interrupted sweep resumes without recomputing, a sweep can be
sharded like `eval`, and a later `eval` at the chosen setting reads the maps it already has. Then every
(block, t) is scored (PCK@alpha per point and per image) and the grid is written with a heat map and a line
plot per timestep.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ditf.errors import DatasetError, InvalidArgumentError
from ditf.eval.extractors import DiTFExtractor
from ditf.eval.keypoints import CorrespondenceDataset, ImageRecord
from ditf.eval.prompts import PromptPolicy
from ditf.eval.protocol import protocol_for
from ditf.eval.scoring import score_pairs
from ditf.eval.sharding import parse_shard, shard_images
from ditf.eval.sources import CachedExtractor
from ditf.features.io import check_feature_map
from ditf.indices import parse_indices
from ditf.io import write_json_atomic
from ditf.smoke import is_smoke_model
from ditf.versions import ditf_version

SWEEP_BENCHMARKS = ("spair", "ap10k", "pfpascal")


def parse_blocks(text: str) -> list[int]:
    """'4-22:2' | '12,16,20' | '19-28' -> sorted distinct block indices (ranges inclusive, ':step' optional)."""
    return sorted(set(parse_indices(text, "blocks", negative=False)))


def parse_timesteps(text: str) -> list[float]:
    """'50,150,261' -> [50.0, 150.0, 261.0] (timesteps on the 0..1000 scale)."""
    try:
        values = [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError as err:
        raise InvalidArgumentError(f"t={text!r}: give timesteps separated by commas, e.g. 50,150,261.") from err
    if not values:
        raise InvalidArgumentError(f"t={text!r} lists no timestep; give e.g. 50,150,261.")
    return values


def subset_pairs(dataset: CorrespondenceDataset, count: int | None, seed: int) -> CorrespondenceDataset:
    """`count` pairs of `dataset` drawn with `seed` (the same pairs for the same split, count and seed), in
    dataset order; all pairs when `count` is None."""
    if count is None:
        return dataset
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidArgumentError(f"pairs={count!r} must be a whole number >= 1 (or None for every pair).")
    if count > len(dataset.pairs):
        raise DatasetError(f"pairs={count}: the {dataset.name} {dataset.split} split has only {len(dataset.pairs)} pairs; "
                           f"ask for at most {len(dataset.pairs)}.")
    names = sorted(pair.name for pair in dataset.pairs)
    chosen = set(random.Random(seed).sample(names, count))
    return replace(dataset, pairs=[pair for pair in dataset.pairs if pair.name in chosen])


def sweep(dataset: CorrespondenceDataset, extractor: DiTFExtractor, blocks: Sequence[int], timesteps: Sequence[float],
          *, cache_dir: str | Path, prompt_mode: str | None = None, shard: str | tuple[int, int] | None = None,
          workers: int = 1, threads: int | None = None, output: str | Path | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Score every (block, t) of `blocks` x `timesteps` on `dataset` (already subset), DiTF protocol.

    `extractor` holds the model and the other settings (ensemble, resolution, ...). With `shard` ("i/n"), only
    this share of the images is extracted and the shard summary is returned. Otherwise the results dict:
    `benchmark`, `blocks`, `t`, `per_point` and `per_image` grids (PCK@alpha in percent, [t index][block
    index]), `best` {block, t, per_point, per_image} (by per-point PCK), `settings`, `ditf_version`; with
    `output` (a folder) also `sweep.json`, `sweep_heatmap.png` and `sweep_lines.png` there. `workers` and
    `threads` say how the pairs are scored (`ditf.eval.scoring.predict_pairs`).
    """
    blocks = sorted(set(blocks))
    timesteps = list(timesteps)
    if not blocks or not timesteps:
        raise InvalidArgumentError("a sweep needs at least one block and one timestep.")
    prompts = PromptPolicy(prompt_mode or extractor.prompt_mode)
    images = dataset.images() if shard is None else shard_images(dataset.images(), *parse_shard(shard))
    base = extractor.with_settings(block=tuple(blocks) if len(blocks) > 1 else blocks[0])
    at_t = {t: base.with_settings(t=t) for t in timesteps}  # every timestep checked before any extraction
    extracted = 0
    hashes: dict[Path, str] = {}  # each image is hashed once for every block and timestep
    for t in timesteps:
        sources = {k: CachedExtractor(at_t[t].with_settings(block=k), cache_dir, prompts, image_hashes=hashes)
                   for k in blocks}
        for image in tqdm(images, desc=f"t={t:g}: {len(blocks)} blocks per image", disable=not progress):
            extracted += _fill(image, at_t[t], sources, prompts(image))
    if shard is not None:
        index, count = parse_shard(shard)
        return {"shard": f"{index}/{count}", "images": len(images), "extracted": extracted}
    protocol = protocol_for(dataset)
    per_point = [[0.0] * len(blocks) for _ in timesteps]
    per_image = [[0.0] * len(blocks) for _ in timesteps]
    for i, t in enumerate(tqdm(timesteps, desc="scoring", disable=not progress)):
        for j, k in enumerate(blocks):
            source = CachedExtractor(at_t[t].with_settings(block=k), cache_dir, prompts, cache_only=True,
                                     image_hashes=hashes)
            scores = score_pairs(dataset, source, protocol, workers=workers, threads=threads, progress=False)
            per_point[i][j], per_image[i][j] = scores["all_per_point"], scores["all_per_image"]
    i, j = max(((i, j) for i in range(len(timesteps)) for j in range(len(blocks))), key=lambda c: per_point[c[0]][c[1]])
    results = {
        "benchmark": dataset.describe(), "alpha": protocol.alphas[0], "blocks": blocks, "t": timesteps,
        "per_point": per_point, "per_image": per_image,
        "best": {"block": blocks[j], "t": timesteps[i], "per_point": per_point[i][j], "per_image": per_image[i][j]},
        "settings": {k: v for k, v in base.describe().items() if k not in ("block", "t")},
        "prompt_mode": prompts.mode, "protocol": protocol.card(), "ditf_version": ditf_version(),
    }
    if is_smoke_model(extractor.model):
        results["random_weights"] = "random-weight smoke model: these numbers are meaningless"
    if output is not None:
        write_sweep(results, Path(output))
    return results


def _fill(image: ImageRecord, extractor: DiTFExtractor, sources: dict[int, CachedExtractor], prompt: str) -> int:
    """Extract the blocks of `sources` that `image` lacks in the cache, all in one forward pass; store each block's
    map under its single-block key. Returns 1 when the model ran, else 0."""
    keys = {k: source.key_for(image) for k, source in sources.items()}
    missing = [k for k, source in sources.items() if not source.cache.contains(keys[k])]
    if not missing:
        return 0
    first = sources[missing[0]].cache
    with first.lock(keys[missing[0]]):
        missing = [k for k in missing if not sources[k].cache.contains(keys[k])]  # another process may have run
        if not missing:
            return 0
        settings = extractor.settings.replace(block=tuple(missing) if len(missing) > 1 else missing[0], prompt=prompt)
        found = extractor.featurizer.extract(image.path, settings=settings)
        found = found if isinstance(found, dict) else {missing[0]: found}
        for k in missing:
            features = check_feature_map(found[k].features, f"extractor output for {image.path} (block {k})")
            sources[k].cache.store(keys[k], features, settings=sources[k].settings,
                                   metadata={"image": str(image.path), "prompt": prompt})
    return 1


def write_sweep(results: dict[str, Any], folder: Path) -> dict[str, Path]:
    """`sweep.json`, `sweep_heatmap.png` (PCK per point, block x t) and `sweep_lines.png` (PCK against the block,
    one line per t) in `folder`, written atomically; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ditf.io import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json_atomic(folder / "sweep.json", results)}
    grid = np.asarray(results["per_point"])
    blocks, timesteps, best = results["blocks"], results["t"], results["best"]
    title = f"{results['benchmark']['name']} {results['benchmark']['split']}, {results['benchmark']['pairs']} pairs"
    if "random_weights" in results:
        title += f"\n{results['random_weights']}"

    figure, axes = plt.subplots(figsize=(max(5.0, 0.45 * len(blocks) + 2), max(3.0, 0.45 * len(timesteps) + 1.5)))
    image = axes.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
    axes.set_xticks(range(len(blocks)), [str(b) for b in blocks])
    axes.set_yticks(range(len(timesteps)), [f"{t:g}" for t in timesteps])
    axes.set_xlabel("block k")
    axes.set_ylabel("timestep t")
    for (row, column), value in np.ndenumerate(grid):
        axes.text(column, row, f"{value:.1f}", ha="center", va="center", fontsize=7,
                  color="white" if value < grid.max() - 0.5 * (grid.max() - grid.min()) else "black")
    axes.set_title(f"PCK@{results['alpha']} per point: {title}\nbest: block {best['block']}, t {best['t']:g}", fontsize=9)
    figure.colorbar(image, ax=axes)
    paths["heatmap"] = _save(figure, folder / "sweep_heatmap.png", atomic_path, plt)

    figure, axes = plt.subplots(figsize=(6, 4))
    for row, t in enumerate(timesteps):
        axes.plot(blocks, grid[row], marker="o", label=f"t={t:g}")
    axes.set_xlabel("block k")
    axes.set_ylabel(f"PCK@{results['alpha']} per point (%)")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    paths["lines"] = _save(figure, folder / "sweep_lines.png", atomic_path, plt)
    return paths


def _save(figure: Any, path: Path, atomic_path: Any, plt: Any) -> Path:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path
