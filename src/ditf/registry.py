"""Named model presets: hub id and DiTF defaults, each number with where it comes from."""

from __future__ import annotations

from dataclasses import dataclass, field

from ditf.errors import UnknownModelError


@dataclass(frozen=True)
class MassiveChannels:
    """Known massive-activation channels of a model's residual stream, with provenance."""

    channels: tuple[int, ...]
    source: str
    verified: bool
    """True when taken from released code or measured by us; False for numbers quoted from papers only."""


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
    """Guidance embedding value for guidance-distilled models (FLUX.1-dev, FLUX.2)."""
    prompt: str = ""
    extra: dict = field(default_factory=dict)


_DITF_CODE = "DiTF authors' code (github.com/ganchaofan0000/DiTF @08658e6, README and eval_spair.py)"
_OURS = "ditf default: no published DiTF setting; about half depth as FLUX k=28 of 57, t=261, to be tuned"

PRESETS: dict[str, Preset] = {
    p.alias: p
    for p in [
        Preset("flux-dev", "black-forest-labs/FLUX.1-dev", "flux", 28, 261, 640, 8, _DITF_CODE,
               MassiveChannels((154, 1446), _DITF_CODE + ": hard-coded channel discard", True), guidance=3.5),
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
        Preset("flux2-dev", "black-forest-labs/FLUX.2-dev", "flux2", 28, 261, 640, 8, _OURS, guidance=4.0),
        Preset("flux2-klein", "black-forest-labs/FLUX.2-klein-4B", "flux2", 12, 261, 640, 8, _OURS),
        Preset("flux2-klein-9b", "black-forest-labs/FLUX.2-klein-9B", "flux2", 16, 261, 640, 8, _OURS),
    ]
}


def get_preset(alias: str) -> Preset:
    """The preset named `alias`; an unknown alias lists the known ones."""
    if alias not in PRESETS:
        raise UnknownModelError(
            f"unknown model alias {alias!r}. Known aliases: {', '.join(PRESETS)}; or pass a Hugging Face hub id "
            "(owner/name), a local diffusers folder or a single-file checkpoint."
        )
    return PRESETS[alias]


def preset_for_hub_id(hub_id: str) -> Preset | None:
    """The preset whose hub id is `hub_id`, if any (so hub ids get the same defaults as aliases)."""
    return next((p for p in PRESETS.values() if p.hub_id == hub_id), None)
