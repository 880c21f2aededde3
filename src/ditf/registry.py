"""Named model presets and task presets: every default number with where it comes from.

A `Preset` holds a released model's DiTF defaults (block k, timestep t, resolution, ensemble, ...); a
`TaskPreset` holds the defaults of one benchmark protocol (`TASK_DEFAULTS`, for every model) or of one model on
one task (`Preset.tasks`, e.g. FLUX.1-dev's DAVIS block and timestep). `ditf.settings.resolve_settings` is the
only place where these defaults are applied. A model without a task preset keeps its own block and timestep
for that task, and the results say so; no model silently gets another model's numbers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ditf.errors import UnknownModelError


@dataclass(frozen=True)
class MassiveChannels:
    """Known massive-activation channels of a model's residual stream, with provenance."""

    channels: tuple[int, ...]
    source: str
    verified: bool
    """True when taken from released code or measured by us; False for numbers quoted from papers only."""


@dataclass(frozen=True)
class TaskPreset:
    """Defaults of one task: `settings` are `FeatureSettings` fields (block, t, ensemble, prompt, ...),
    `protocol` the task's own options (e.g. DAVIS `short_side`, SPair `prompt_mode`); `source` says where
    they come from."""

    source: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    protocol: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Preset:
    """Defaults for one released model. `block` is the global block index k, `t` in 0..1000,
    `resolution` the long image side in pixels, `ensemble` the number of noise draws."""

    alias: str
    hub_id: str
    family: str
    block: int
    t: int
    resolution: int
    ensemble: int
    source: str
    """Where block / t / resolution / ensemble come from."""
    massive: MassiveChannels | None = None
    guidance: float | None = None
    """Guidance embedding value for guidance-distilled models (FLUX.1-dev, FLUX.2-dev)."""
    vae_sample: str | None = None
    """How latents are drawn from the VAE posterior when it differs from the family default."""
    tasks: Mapping[str, TaskPreset] = field(default_factory=dict)
    """Per task name (see `TASKS`), this model's published defaults for it."""
    verified: bool = False
    """True when block and t come from released code or a measurement (a sweep); False for ditf's guesses."""
    origin: str = "built-in"
    """"built-in", or the user preset file it comes from."""

    def setting_defaults(self) -> dict[str, tuple[Any, str]]:
        """`FeatureSettings` field -> (value, source) for every default this preset sets."""
        defaults = {name: (getattr(self, name), self.source) for name in ("block", "t", "resolution", "ensemble")}
        if self.guidance is not None:
            defaults["guidance"] = (self.guidance, self.source)
        if self.vae_sample is not None:
            defaults["vae_sample"] = (self.vae_sample, self.source)
        return defaults


_DITF_CODE = "DiTF authors' code (github.com/ganchaofan0000/DiTF @08658e6, README and eval_spair.py)"
_DITF_DAVIS = "DiTF authors' code (github.com/ganchaofan0000/DiTF @08658e6, eval_davis.sh and README)"
_OURS = "ditf default: no published DiTF setting; about half depth as FLUX k=28 of 57, t=261, to be tuned"
_FLUX2_PIPELINE = "Flux2Pipeline: guidance_scale 4.0 and posterior-mode VAE latents (retrieve_latents 'argmax')"

CORRESPONDENCE_TASKS = ("spair", "pfpascal", "ap10k")
"""Keypoint-correspondence benchmarks: a model's own preset (block, t, resolution, ensemble) is its setting for these."""
TASKS = (*CORRESPONDENCE_TASKS, "davis", "hpatches", "ade20k")
"""Tasks with task presets: the correspondence benchmarks, DAVIS-2017 label propagation, HPatches homography
estimation and ADE20K segmentation transfer."""

_CORRESPONDENCE = TaskPreset(
    "DiTF authors' eval_spair.py (@08658e6): one class prompt per image, 'a photo of a {category}'",
    protocol={"prompt_mode": "class"},
)
TASK_DEFAULTS: Mapping[str, TaskPreset] = MappingProxyType({
    "spair": _CORRESPONDENCE,
    "pfpascal": _CORRESPONDENCE,
    "ap10k": _CORRESPONDENCE,
    "davis": TaskPreset(
        _DITF_DAVIS + ": one noise draw, the prompt 'a photo of a image' (sic), frames with short side 960 and the "
        "long side floored to a multiple of 32; DINO's label propagation with the first frame plus 7 previous "
        "frames, window radius 12 cells, top-5, temperature 0.1 (eval_davis.py defaults)",
        settings={"ensemble": 1, "prompt": "a photo of a image"},
        protocol={"short_side": 960, "size_multiple": 32, "n_last_frames": 7, "neighborhood_radius": 12, "topk": 5,
                  "temperature": 0.1},
    ),
    "hpatches": TaskPreset(
        "DIFT's HPatches protocol (Tsingularity/dift @9421eb2, eval_hpatches.py): every image resized to 768x768 "
        "(aspect not kept) and described by its whole low-resolution map, empty prompt. The DiTF paper (Table 8) "
        "publishes no block or timestep for HPatches",
        settings={"size": (768, 768), "resolution": None},
        protocol={"prompt_mode": "empty"},
    ),
    "ade20k": TaskPreset(
        "no published ADE20K feature setting (the DiTF paper reports 54.8 mIoU, Table 6, without its input size, "
        "block, timestep or head): the whole image at the model's own resolution, empty prompt",
        protocol={"prompt_mode": "empty"},
    ),
})
"""Defaults of each task for every model (the protocol as published, model-agnostic parts only)."""

PRESETS: dict[str, Preset] = {
    p.alias: p
    for p in [
        Preset("flux-dev", "black-forest-labs/FLUX.1-dev", "flux", 28, 261, 640, 8, _DITF_CODE,
               MassiveChannels((154, 1446), _DITF_CODE + ": hard-coded channel discard", True), guidance=3.5,
               tasks={"davis": TaskPreset(_DITF_DAVIS + ": block 24, t 90", settings={"block": 24, "t": 90})},
               verified=True),
        Preset("flux-schnell", "black-forest-labs/FLUX.1-schnell", "flux", 28, 261, 640, 8,
               "FLUX.1-dev settings reused (same architecture); not published for schnell"),
        Preset("sd3-medium", "stabilityai/stable-diffusion-3-medium-diffusers", "sd3", 12, 261, 640, 8, _OURS,
               MassiveChannels((810,), "Gan et al. 2025, Detail Guidance (arXiv 2510.11538), as quoted", False)),
        Preset("sd3.5-medium", "stabilityai/stable-diffusion-3.5-medium", "sd3", 12, 261, 640, 8, _OURS,
               MassiveChannels((676,), "DiTF paper (arXiv 2505.18584) per secondary summary: 'only dimension 676 in SD3-5'", False)),
        Preset("sd3.5-large", "stabilityai/stable-diffusion-3.5-large", "sd3", 19, 261, 640, 8, _OURS,
               MassiveChannels((676,), "DiTF paper per secondary summary ('SD3-5', model size not stated)", False)),
        Preset("pixart-alpha", "PixArt-alpha/PixArt-XL-2-1024-MS", "pixart", 14, 261, 1024, 8, _OURS),
        Preset("pixart-alpha-512", "PixArt-alpha/PixArt-XL-2-512x512", "pixart", 14, 261, 512, 8, _OURS),
        Preset("pixart-sigma", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "pixart", 14, 261, 1024, 8, _OURS),
        Preset("dit-xl-2-256", "facebook/DiT-XL-2-256", "dit", 14, 261, 256, 8, _OURS),
        Preset("dit-xl-2-512", "facebook/DiT-XL-2-512", "dit", 14, 261, 512, 8, _OURS),
        Preset("sana-1600m", "Efficient-Large-Model/Sana_1600M_1024px_diffusers", "sana", 10, 261, 1024, 8, _OURS),
        Preset("qwen-image", "Qwen/Qwen-Image", "qwen-image", 30, 261, 640, 8, _OURS),
        Preset("flux2-dev", "black-forest-labs/FLUX.2-dev", "flux2", 28, 261, 640, 8, _OURS + "; " + _FLUX2_PIPELINE,
               guidance=4.0, vae_sample="mode"),
        Preset("flux2-klein", "black-forest-labs/FLUX.2-klein-4B", "flux2", 12, 261, 640, 8, _OURS + "; " + _FLUX2_PIPELINE,
               vae_sample="mode"),
        Preset("flux2-klein-9b", "black-forest-labs/FLUX.2-klein-9B", "flux2", 16, 261, 640, 8,
               _OURS + "; " + _FLUX2_PIPELINE, vae_sample="mode"),
    ]
}


PRESETS_ENV = "DITF_PRESETS"
"""Environment variable listing user preset files (TOML), separated by the path separator (":" on Linux)."""
PRESET_FIELDS = ("model", "family", "block", "t", "resolution", "ensemble", "guidance", "vae_sample", "source",
                 "verified", "provenance")
"""Keys a user preset table may hold (`[presets."<name>"]` in a TOML file)."""
_ACTIVE_FILES: list[Path] = []


def user_preset_files() -> list[Path]:
    """The user preset files in force: those in $DITF_PRESETS, then those given for this run (`preset_files`)."""
    listed = [Path(p).expanduser() for p in os.environ.get(PRESETS_ENV, "").split(os.pathsep) if p.strip()]
    return listed + list(_ACTIVE_FILES)


@contextmanager
def preset_files(paths: Iterable[str | os.PathLike[str]]) -> Iterator[None]:
    """Inside the block, the user preset files `paths` are in force too (after those of $DITF_PRESETS)."""
    added = [Path(p).expanduser() for p in paths]
    for path in added:
        read_preset_file(path)  # fail now, naming the file, rather than at the first lookup
    _ACTIVE_FILES.extend(added)
    try:
        yield
    finally:
        del _ACTIVE_FILES[len(_ACTIVE_FILES) - len(added):]


def all_presets() -> dict[str, Preset]:
    """Every preset by name: the built-in ones, overridden and extended by the user preset files in force."""
    merged = dict(PRESETS)
    for path in user_preset_files():
        merged.update(_read_preset_file_once(path))
    return merged


_READ_FILES: dict[tuple[Path, bytes], dict[str, Preset]] = {}


def _read_preset_file_once(path: Path) -> dict[str, Preset]:
    """`read_preset_file`, parsed again only when the file's bytes change (every model lookup asks for the
    presets, and a file can change within one modification-time tick)."""
    try:
        key = (path.resolve(), path.read_bytes())
    except OSError:
        return read_preset_file(path)  # reports the missing or unreadable file
    if key not in _READ_FILES:
        _READ_FILES[key] = read_preset_file(path)
    return _READ_FILES[key]


def get_preset(alias: str) -> Preset:
    """The preset named `alias` (user presets included); an unknown alias lists the known ones."""
    presets = all_presets()
    if alias not in presets:
        raise UnknownModelError(
            f"unknown model alias {alias!r}. Known aliases: {', '.join(presets)}; or pass a Hugging Face hub id "
            "(owner/name), a local diffusers folder or a single-file checkpoint."
        )
    return presets[alias]


def preset_for_hub_id(hub_id: str) -> Preset | None:
    """The preset whose hub id is `hub_id`, if any (so hub ids get the same defaults as aliases)."""
    return next((p for p in all_presets().values() if p.hub_id == hub_id), None)


def preset_for(model: str | None) -> Preset | None:
    """The preset of a model reference without loading anything: an alias, the hub id of a preset, or a local
    path that a user preset names (compared as resolved paths); None otherwise."""
    if model is None:
        return None
    presets = all_presets()
    if model in presets:
        return presets[model]
    found = preset_for_hub_id(model)
    if found is not None or not Path(model).expanduser().exists():
        return found
    resolved = Path(model).expanduser().resolve()
    return next((p for p in presets.values() if p.origin != "built-in" and Path(p.hub_id).expanduser().exists()
                 and Path(p.hub_id).expanduser().resolve() == resolved), None)


def read_preset_file(path: str | os.PathLike[str]) -> dict[str, Preset]:
    """The presets of a user preset file: TOML tables `[presets."<name>"]` with `PRESET_FIELDS` keys. A name that
    is a built-in alias overrides it (unset fields keep the built-in values); another name needs `block`, `t`,
    `resolution` and `ensemble`, and `model` (a hub id or a path; default: the name)."""
    path = Path(path)
    if not path.is_file():
        raise UnknownModelError(f"preset file {path} does not exist; check {PRESETS_ENV} or --presets.")
    try:
        data = _read_toml(path)
    except ValueError as err:
        raise UnknownModelError(f"preset file {path} is not valid TOML ({err}); fix or delete it.") from err
    tables = data.get("presets", {})
    extra = sorted(set(data) - {"presets"})
    if extra or not isinstance(tables, dict):
        raise UnknownModelError(f"preset file {path}: only [presets.\"<name>\"] tables are allowed, found {extra or tables!r}.")
    return {name: _preset_from_table(path, name, table) for name, table in tables.items()}


def _preset_from_table(path: Path, name: str, table: Any) -> Preset:
    where = f"preset file {path}, [presets.{json.dumps(name)}]"
    if not isinstance(table, dict):
        raise UnknownModelError(f"{where} is not a table of settings.")
    unknown = sorted(set(table) - set(PRESET_FIELDS))
    if unknown:
        raise UnknownModelError(f"{where}: unknown keys {unknown}; valid keys are {', '.join(PRESET_FIELDS)}.")
    base = PRESETS.get(name)
    values: dict[str, Any] = {}
    for key in ("block", "t", "resolution", "ensemble"):
        value = table.get(key, getattr(base, key, None))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (key != "t" and not isinstance(value, int)):
            raise UnknownModelError(f"{where}: `{key}` must be a number" + ("" if base else " (required for a new model)")
                                    + f"; got {value!r}.")
        values[key] = value
    provenance = table.get("provenance", {})
    summary = ", ".join(f"{k} {v}" for k, v in provenance.items()) if isinstance(provenance, dict) else str(provenance)
    source = str(table.get("source") or f"user preset ({path})" + (f": {summary}" if summary else ""))
    return Preset(
        alias=name, hub_id=str(table.get("model", base.hub_id if base else name)),
        family=str(table.get("family", base.family if base else "unknown")), block=int(values["block"]),
        t=values["t"], resolution=int(values["resolution"]), ensemble=int(values["ensemble"]), source=source,
        massive=base.massive if base else None, guidance=table.get("guidance", base.guidance if base else None),
        vae_sample=table.get("vae_sample", base.vae_sample if base else None), tasks=base.tasks if base else {},
        verified=bool(table.get("verified", bool(provenance))), origin=str(path),
    )


def write_preset(path: str | os.PathLike[str], name: str, **fields: Any) -> Path:
    """Write (or update) preset `name` in the user preset file `path` with `fields` (`PRESET_FIELDS`; `provenance`
    a table of scalars), keeping the file's other presets; atomic. Returns the path."""
    from ditf.io import write_text_atomic

    unknown = sorted(set(fields) - set(PRESET_FIELDS))
    if unknown:
        raise UnknownModelError(f"unknown preset keys {unknown}; valid keys are {', '.join(PRESET_FIELDS)}.")
    path = Path(path)
    data = _read_toml(path) if path.is_file() else {}
    presets = data.setdefault("presets", {})
    presets[name] = {**presets.get(name, {}), **{k: v for k, v in fields.items() if v is not None}}
    _preset_from_table(path, name, presets[name])  # refuse a preset that could not be read back, before writing
    write_text_atomic(path, _toml(data))
    return path


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    with open(path, "rb") as handle:
        return tomllib.load(handle)


def _toml(data: dict[str, Any], prefix: str = "") -> str:
    """TOML text of nested tables of scalars (strings, numbers, booleans, lists of them)."""
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    lines = [f"[{prefix}]"] if prefix and scalars else []
    lines += [f"{json.dumps(k) if not k.isidentifier() else k} = {_toml_value(v)}" for k, v in scalars.items()]
    text = "\n".join(lines) + ("\n\n" if lines else "")
    for key, table in tables.items():
        name = json.dumps(key) if not key.replace("_", "").isalnum() else key
        text += _toml(table, f"{prefix}.{name}" if prefix else name)
    return text


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def task_preset(preset: Preset | None, task: str) -> tuple[dict[str, tuple[Any, str]], dict[str, tuple[Any, str]]]:
    """(settings, protocol) defaults of `task` for the model of `preset`, each name -> (value, source).

    The task's defaults for every model come first, then the model's own task preset. Outside the correspondence
    tasks (which model presets are made for), a model without a task preset keeps its own block and timestep,
    and the source of those says that no setting for this task was published.
    """
    if task not in TASKS:
        raise UnknownModelError(f"unknown task {task!r}; tasks with presets: {', '.join(TASKS)}.")
    settings: dict[str, tuple[Any, str]] = {}
    protocol: dict[str, tuple[Any, str]] = {}
    for found in (TASK_DEFAULTS.get(task), preset.tasks.get(task) if preset is not None else None):
        if found is None:
            continue
        settings.update({name: (value, found.source) for name, value in found.settings.items()})
        protocol.update({name: (value, found.source) for name, value in found.protocol.items()})
    if preset is not None and task not in preset.tasks and task not in CORRESPONDENCE_TASKS:
        own = f"{preset.alias} has no published {task} setting: its own preset ({preset.source})"
        for name in ("block", "t"):
            settings.setdefault(name, (getattr(preset, name), own))
    return settings, protocol
