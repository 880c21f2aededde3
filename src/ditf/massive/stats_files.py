"""Statistics tables on disk: a JSON index (`stats.json`) and the per-channel vectors in a binary file beside it.

The JSON keeps the provenance, the timesteps and one row per (block, step) cell with its scalars; the vectors
(mean_abs, mean, max_abs, median_abs, p999_abs, each (n_cells, C) float32) go to `<name>.safetensors`. That is 4
bytes a value instead of ~26 in JSON text: a FLUX.1-dev scan of 57 blocks x 28 steps x 3072 channels is ~100 MB
instead of ~640 MB. Both files are written atomically, the vectors first; the loader refuses a JSON whose vectors
file is missing or does not match it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ditf.errors import InvalidArgumentError
from ditf.io import write_bytes_atomic, write_json_atomic
from ditf.massive.stats import ChannelStats, StatsTable

FORMAT = "ditf.massive.StatsTable"
VERSION = 2
VECTORS = ("mean_abs", "mean", "max_abs", "median_abs", "p999_abs")
"""The stored (C,) vectors of every cell, in file order."""


def arrays_path(path: str | os.PathLike[str]) -> Path:
    """Where the vectors of the table indexed by `path` (a .json file) are: the same name with `.safetensors`."""
    return Path(path).with_suffix(".safetensors")


def save_stats_table(table: StatsTable, path: str | os.PathLike[str]) -> Path:
    """Save a `StatsTable`: the JSON index at `path` and its vectors in `arrays_path(path)`; return `path`.

    Refuses (before writing anything) statistics holding NaN or infinity, which mean the activations overflowed.
    """
    target = Path(path)
    if target.suffix != ".json":
        raise InvalidArgumentError(f"statistics file {str(target)!r}: name it *.json (the vectors go beside it).")
    cells = table.items()
    if not cells:
        raise InvalidArgumentError("the statistics table is empty; record at least one block and step first.")
    vectors = {name: torch.stack([getattr(stats, name) for _, stats in cells]).float().contiguous() for name in VECTORS}
    scalars = [stats.median_all for _, stats in cells]
    if not all(bool(torch.isfinite(v).all()) for v in vectors.values()) or not all(math.isfinite(x) for x in scalars):
        raise InvalidArgumentError(
            f"the statistics for {str(target)!r} hold NaN or infinity: the activations overflowed (e.g. float16 on a "
            "model that needs bfloat16 or float32). Record in a wider dtype."
        )
    from safetensors.torch import save

    arrays = arrays_path(target)
    write_bytes_atomic(arrays, save(vectors))
    index = {
        "format": FORMAT,
        "version": VERSION,
        "meta": table.meta,
        "timesteps": {str(step): t for step, t in sorted(table.timesteps.items())},
        "num_channels": table.num_channels,
        "arrays": arrays.name,
        "vectors": list(VECTORS),
        "cells": [{"block": b, "step": s, "row": row, "median_all": stats.median_all, "n_tokens": stats.n_tokens,
                   "n_calls": stats.n_calls} for row, ((b, s), stats) in enumerate(cells)],
    }
    return write_json_atomic(target, index)


def load_stats_table(path: str | os.PathLike[str]) -> StatsTable:
    """Read a `StatsTable` written by `save_stats_table` (or an older all-JSON one)."""
    source = Path(path)
    if source.is_dir():
        source = source / "stats.json"
    if not source.is_file():
        raise InvalidArgumentError(
            f"statistics file {str(source)!r} does not exist; pass a stats.json written by a scan (or its folder)."
        )
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InvalidArgumentError(
            f"statistics file {str(source)!r} is not valid JSON ({err}); rewrite it with save_stats_table()."
        ) from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InvalidArgumentError(f"{str(source)!r} is not a statistics table (format {data.get('format')!r} if "
                                   "any); pass the stats.json of a scan.")
    if data.get("version", 1) == 1:
        return StatsTable.from_dict(data)
    return _table_from_index(data, source)


def _table_from_index(data: dict[str, Any], source: Path) -> StatsTable:
    from safetensors.torch import load_file

    arrays = source.parent / data["arrays"]
    if not arrays.is_file():
        raise InvalidArgumentError(f"{str(source)!r} keeps its vectors in {arrays.name}, which is missing; copy the "
                                   "two files together.")
    vectors = load_file(arrays)
    rows = len(data["cells"])
    expected = (rows, data["num_channels"])
    wrong = {name: tuple(vectors[name].shape) for name in VECTORS if name not in vectors or vectors[name].shape != expected}
    if wrong:
        raise InvalidArgumentError(f"{arrays.name} does not match {source.name} (expected {len(VECTORS)} vectors of "
                                   f"shape {expected}; got {wrong}); write both again with save_stats_table().")
    table = StatsTable(timesteps={int(k): v for k, v in data.get("timesteps", {}).items()}, meta=data.get("meta"))
    for cell in data["cells"]:
        row = cell["row"]
        stats = ChannelStats(**{name: vectors[name][row] for name in VECTORS}, median_all=float(cell["median_all"]),
                             n_tokens=int(cell["n_tokens"]), n_calls=int(cell.get("n_calls", 1)))
        table.add(cell["block"], cell["step"], stats)
    return table


__all__ = ["arrays_path", "load_stats_table", "save_stats_table"]
