"""Checks of a model's files before anything is loaded: every component a run needs is there and readable.

A diffusers pipeline folder lists its components in `model_index.json`; each listed component must have its
folder, each model its `config.json` and complete safetensors files (headers that parse, files as long as
their headers say), each tokenizer its files. A missing or broken part is named, with the fix, instead of
failing deep inside diffusers, or worse, being replaced silently by something else (a missing tokenizer).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ditf.errors import UnknownModelError

MODEL_CONFIGS = ("config.json", "scheduler_config.json", "preprocessor_config.json", "tokenizer_config.json")
FIX = "download the model again (hf download <repo>) or restore the missing files"


def read_json(path: Path, what: str) -> Any:
    """The JSON in `path`; an error naming the file when it is missing, empty or not JSON."""
    if not path.is_file():
        raise UnknownModelError(f"{what} {path} is missing; {FIX}.")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise UnknownModelError(f"{what} {path} is empty; {FIX}.")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UnknownModelError(f"{what} {path} is not valid JSON ({err.msg} at line {err.lineno}); {FIX}.") from err


def safetensors_header(path: Path) -> tuple[int, bytes]:
    """(length the file's first 8 bytes give, the JSON header bytes); length -1 and b"" when the file is shorter
    than 8 bytes, b"" when the length does not fit in the file."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        return length, handle.read(length) if 0 < length <= size - 8 else b""


def check_safetensors(path: Path) -> None:
    """Refuse a safetensors file whose header does not parse or whose data is shorter than the header says."""
    size = path.stat().st_size
    length, header = safetensors_header(path)
    try:
        entries = json.loads(header) if header else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        entries = None
    if not isinstance(entries, dict):
        raise UnknownModelError(f"{path} is not a readable safetensors file (its header is broken); {FIX}.")
    end = max((entry["data_offsets"][1] for name, entry in entries.items()
               if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry), default=0)
    if 8 + length + end > size:
        raise UnknownModelError(
            f"{path} is truncated: it holds {size} bytes but its header describes {8 + length + end}; {FIX}."
        )


def check_pipeline_folder(folder: Path, required: Iterable[str] = ()) -> dict[str, Any]:
    """Check every component `model_index.json` of `folder` lists, and that the `required` ones are listed;
    return the index. Components saved as absent (`[null, null]`) are allowed unless required."""
    index = read_json(folder / "model_index.json", "the pipeline index")
    if not isinstance(index, dict):
        raise UnknownModelError(f"{folder / 'model_index.json'} is not a pipeline index (a JSON object); {FIX}.")
    present = {name for name, spec in index.items()
               if not name.startswith("_") and isinstance(spec, list) and len(spec) == 2 and spec[1] is not None}
    missing = sorted(set(required) - present)
    if missing:
        raise UnknownModelError(f"{folder} has no {', '.join(missing)} (see its model_index.json), which this run "
                                "needs; pass a pipeline folder that has them.")
    for name in sorted(present):
        check_component(folder / name, name)
    return index


def check_component(folder: Path, name: str) -> None:
    """A component folder exists and holds a readable config, or tokenizer files, and complete weights."""
    if not folder.is_dir() or not any(folder.iterdir()):
        raise UnknownModelError(f"the {name} folder {folder} is missing or empty, but model_index.json lists it; {FIX}.")
    for config in MODEL_CONFIGS:
        if (folder / config).exists():
            read_json(folder / config, f"the {name} config")
    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors(weights)
