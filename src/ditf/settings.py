"""`FeatureSettings`: every choice that decides what a DiTF feature is, in one frozen, recorded object.

`resolve_settings(preset, task=..., **overrides)` is the only place where model and task presets apply. The
featurizer, the command line, the evaluation cache key, `massive scan` and every results file use and record
a `FeatureSettings`. This module imports no torch, so the command line can build settings before loading a
model.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, Union

from ditf.errors import InvalidArgumentError
from ditf.registry import Preset, task_preset

Discard = Union[Literal["auto"], tuple[int, ...], None]
"""`"auto"` (the preset's verified massive channels, else those detected in each image), channel indices, or None."""
VAE_SAMPLES = ("per_member", "shared", "mode")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""The dtype names ditf uses everywhere (command line, settings, results), and the torch dtype each names."""
MASSIVE_RATIO = 100.0
"""Default `massive_ratio` (see `ditf.channels.MASSIVE_RATIO`; repeated here so this module needs no torch)."""
VARIANTS: Mapping[str, Mapping[str, Any]] = {
    "raw": {"normalize": False, "modulate": False, "discard": None},
    "ln": {"normalize": True, "modulate": False, "discard": None},
    "adaln": {"normalize": True, "modulate": True, "discard": None},
    "ditf": {"normalize": True, "modulate": True, "discard": "auto"},
}
"""The DiTF paper's ablation (raw 29.9 -> +AdaLN 65.3 -> +discard 67.1 PCK): the settings each row changes."""
NONE_IS_A_VALUE = ("discard",)
"""Settings for which None is a choice (discard nothing) rather than "not given"."""


@dataclass(frozen=True)
class FeatureSettings:
    """What a DiTF feature map is computed with. Every field is checked on construction.

    block: global block index k (negative counts from the end), or several (a tuple: features of every listed
    block from one forward pass that stops after the deepest); t: timestep on the 0..1000 scale; ensemble:
    noise draws averaged; resolution: long image side in pixels, or size: exact (height, width) in pixels
    (multiples of the model stride), one of them for images (neither for latents); pad_square: pad the resized image to a square; discard: see `Discard`;
    massive_ratio: the ratio of the automatic massive-channel rule; normalize / modulate: the LayerNorm and AdaLN
    steps; prompt: text prompt (a class index or label for DiT); guidance: embedded guidance (FLUX.1-dev,
    FLUX.2-dev; None: the model's default); seed: noise seed; vae_sample: "per_member", "shared" or "mode"
    (None: the model family's default); model: the model reference the settings were resolved for; dtype:
    "fp32", "bf16" or "fp16" (None: bf16 on CUDA, fp32 elsewhere). `sources` says where each value comes from.
    """

    block: int | tuple[int, ...]
    t: float
    ensemble: int
    resolution: int | None = None
    size: tuple[int, int] | None = None
    pad_square: bool = False
    discard: Discard = "auto"
    massive_ratio: float = MASSIVE_RATIO
    normalize: bool = True
    modulate: bool = True
    prompt: str | int = ""
    guidance: float | None = None
    seed: int = 0
    vae_sample: str | None = None
    model: str | None = None
    dtype: str | None = None
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.block, (list, tuple)):
            blocks = tuple(_integer("block", k) for k in self.block)
            if not blocks:
                raise InvalidArgumentError("block=[] names no block; give a block index or a non-empty list of them.")
            if len(set(blocks)) != len(blocks):
                raise InvalidArgumentError(f"block={list(blocks)} lists a block twice; list each block once.")
            object.__setattr__(self, "block", blocks[0] if len(blocks) == 1 else blocks)
        else:
            _integer("block", self.block)
        object.__setattr__(self, "t", _timestep(self.t))
        _integer("ensemble", self.ensemble, minimum=1)
        if self.resolution is not None:
            _integer("resolution", self.resolution, minimum=1)
        if self.size is not None:
            if isinstance(self.size, (str, bytes)) or len(tuple(self.size)) != 2:
                raise InvalidArgumentError(f"size={self.size!r} must be (height, width) in pixels.")
            object.__setattr__(self, "size", tuple(_integer("size", s, minimum=1) for s in self.size))
        if self.resolution is not None and self.size is not None:
            raise InvalidArgumentError(
                f"resolution={self.resolution} and size={self.size} both say how large the image is; give one of them."
            )
        object.__setattr__(self, "discard", parse_discard(self.discard))
        _positive("massive_ratio", self.massive_ratio)
        for name in ("pad_square", "normalize", "modulate"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(f"{name}={getattr(self, name)!r} must be True or False.")
        if not isinstance(self.prompt, (str, int)) or isinstance(self.prompt, bool):
            raise InvalidArgumentError(f"prompt={self.prompt!r} must be a string (or a class index for DiT).")
        if self.guidance is not None:
            _finite("guidance", self.guidance)
        _integer("seed", self.seed, minimum=0)
        if self.vae_sample is not None and self.vae_sample not in VAE_SAMPLES:
            raise InvalidArgumentError(f"vae_sample={self.vae_sample!r} is not one of {', '.join(VAE_SAMPLES)}.")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise InvalidArgumentError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}.")

    # ------------------------------------------------------------------ views
    @property
    def blocks(self) -> tuple[int, ...]:
        """The block indices as a tuple (one for a single block)."""
        return self.block if isinstance(self.block, tuple) else (self.block,)

    @property
    def load_up_to(self) -> int | None:
        """The deepest block to load (`from_pretrained(block=...)`); None when a block counts from the end."""
        return max(self.blocks) if min(self.blocks) >= 0 else None

    @property
    def variant(self) -> str:
        """The paper's ablation row these settings compute: raw, ln, adaln, ditf, or custom."""
        for name, choice in VARIANTS.items():
            discard = self.discard if choice["discard"] is None or self.discard is None else "auto"
            if (self.normalize, self.modulate, discard) == (choice["normalize"], choice["modulate"], choice["discard"]):
                return name
        return "custom"

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values (tuples become lists), without `sources`."""
        values = asdict(self)
        values.pop("sources")
        for name in ("block", "size", "discard"):
            if isinstance(values[name], tuple):
                values[name] = list(values[name])
        return values

    def replace(self, **changes: Any) -> FeatureSettings:
        """A copy with `changes` (field names; unknown names are refused with the valid ones), marked as given
        by the user in `sources`. Giving `size` clears `resolution` and the other way round."""
        check_setting_names(changes)
        if "size" in changes and "resolution" not in changes and changes["size"] is not None:
            changes["resolution"] = None
        if "resolution" in changes and "size" not in changes and changes["resolution"] is not None:
            changes["size"] = None
        sources = {**self.sources, **{name: "given" for name in changes}}
        return replace(self, **changes, sources=sources)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FeatureSettings:
        """Settings from `to_dict()` output (a results file's record)."""
        check_setting_names(values)
        return cls(**{k: tuple(v) if k in ("block", "size", "discard") and isinstance(v, list) else v
                      for k, v in values.items()})


SETTING_NAMES = tuple(f.name for f in fields(FeatureSettings) if f.name != "sources")


def check_setting_names(names: Mapping[str, Any] | list[str], also: tuple[str, ...] = ()) -> None:
    """Refuse names that are not `FeatureSettings` fields (or in `also`), naming the valid ones."""
    valid = SETTING_NAMES + tuple(also)
    unknown = [name for name in names if name not in valid]
    if unknown:
        hints = [f"{name!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(name, valid, n=1))
                 else repr(name) for name in unknown]
        raise InvalidArgumentError(
            f"unknown setting {', '.join(hints)}. Valid settings: {', '.join(valid)}."
        )


def resolve_settings(preset: Preset | None, *, task: str | None = None, model: str | None = None,
                     **overrides: Any) -> FeatureSettings:
    """The one place where defaults apply: ditf's defaults < the model `preset` < the `task`'s presets (see
    `ditf.registry.task_preset`) < `overrides` (None counts as not given, except for `discard`, where None
    means "discard nothing").

    `model` is recorded as the settings' model reference. Errors name a missing setting when the model has no
    preset to take it from, and unknown names in `overrides` with the valid ones.
    """
    check_setting_names(overrides)
    chosen: dict[str, tuple[Any, str]] = {}
    if preset is not None:
        chosen.update(preset.setting_defaults())
    if task is not None:
        chosen.update(task_preset(preset, task)[0])
    given = {name: value for name, value in overrides.items() if value is not None or name in NONE_IS_A_VALUE}
    if "size" in given:
        chosen.pop("resolution", None)
    chosen.update({name: (value, "given") for name, value in given.items()})
    if model is not None:
        chosen.setdefault("model", (model, "given"))
    missing = [name for name in ("block", "t", "ensemble") if name not in chosen]
    if missing:
        what = f"model {model!r}" if model is not None else "this model"
        raise InvalidArgumentError(
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required: {what} has no preset to take "
            f"{'it' if len(missing) == 1 else 'them'} from. Pass {', '.join(f'{n}=...' for n in missing)} (on the "
            f"command line {', '.join('--' + n for n in missing)})."
        )
    values = {name: value for name, (value, _) in chosen.items()}
    sources = {name: source for name, (_, source) in chosen.items()}
    return FeatureSettings(**values, sources=sources)


def task_protocol(preset: Preset | None, task: str, **overrides: Any) -> dict[str, Any]:
    """The task's protocol options (e.g. DAVIS short_side, SPair prompt_mode) for this model, then `overrides`
    (None values count as not given)."""
    options = {name: value for name, (value, _) in task_preset(preset, task)[1].items()}
    options.update({name: value for name, value in overrides.items() if value is not None})
    return options


def parse_discard(value: Any) -> Discard:
    """A `discard` value in canonical form: "auto", None, or a sorted tuple of distinct channel indices.

    Also takes the command line's text: "auto", "none", or comma-separated indices such as "154,1446".
    """
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        if value.strip().lower() == "none":
            return None
        parts = [part.strip() for part in value.split(",")]
        if not all(part.isdigit() for part in parts):
            raise InvalidArgumentError(
                f"discard={value!r}: use auto, none, or channel indices separated by commas, like 154,1446."
            )
        value = [int(part) for part in parts]
    if isinstance(value, (bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise InvalidArgumentError(f"discard={value!r}: use 'auto', a list of channel indices, or None.")
    channels = list(value)
    bad = [c for c in channels if isinstance(c, bool) or not hasattr(c, "__index__") or int(c) < 0]
    if bad:
        raise InvalidArgumentError(f"discard channels {bad} are not channel indices (whole numbers >= 0).")
    if not channels:
        raise InvalidArgumentError("discard=[] lists no channel; pass None to discard nothing.")
    if len(set(map(int, channels))) != len(channels):
        raise InvalidArgumentError(f"discard channels {channels} contain duplicates; list each channel once.")
    return tuple(sorted(int(c) for c in channels))


def _integer(name: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InvalidArgumentError(f"{name}={value!r} must be a whole number.")
    if minimum is not None and value < minimum:
        raise InvalidArgumentError(f"{name}={value} must be at least {minimum}.")
    return value


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgumentError(f"{name}={value!r} must be a finite number.")
    return float(value)


def _positive(name: str, value: Any) -> float:
    if _finite(name, value) <= 0:
        raise InvalidArgumentError(f"{name}={value!r} must be greater than 0.")
    return float(value)


def _timestep(t: Any) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 <= t <= 1000:
        raise InvalidArgumentError(
            f"t={t!r} is outside 0..1000: timesteps are on the 0..1000 scale for every model "
            "(DiTF uses 261 for correspondence, 90 for video)."
        )
    return float(t)


def default_dtype(device: str) -> str:
    """The dtype ditf runs a model in when none is given: bf16 on CUDA, fp32 elsewhere."""
    return "bf16" if str(device).startswith("cuda") else "fp32"


def torch_dtype(name: str | None, device: str = "cpu") -> Any:
    """The torch dtype of a dtype name ("fp32", "bf16", "fp16"); None gives bf16 on CUDA and fp32 elsewhere."""
    import torch

    if name is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise InvalidArgumentError(f"dtype {name!r} is not one of {', '.join(DTYPES)}.")
    return getattr(torch, DTYPES[name])


def dtype_name(dtype: Any) -> str:
    """The ditf name ("fp32", "bf16", "fp16") of a torch dtype."""
    short = str(dtype).removeprefix("torch.")
    for name, long in DTYPES.items():
        if long == short:
            return name
    raise InvalidArgumentError(f"dtype {dtype} is not one ditf runs models in; use one of {', '.join(DTYPES)}.")
