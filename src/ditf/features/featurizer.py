"""`DiTFeaturizer`: DiTF dense features from any supported diffusers DiT."""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ditf.arch import ArchSpec, Conditioning, arch_for
from ditf.errors import InvalidArgumentError
from ditf.features.postprocess import check_channels, ditf_features
from ditf.features.preprocess import ImageInput, prepare_image
from ditf.massive.detect import detect_ratio
from ditf.registry import Preset
from ditf.taps import run_until, tap_block

Discard = Literal["auto"] | Sequence[int] | None
VaeSample = Literal["per_member", "shared", "mode"]
MASSIVE_RATIO = 100.0
"""Default of `massive_ratio`: with `discard="auto"` and no verified preset channels, a channel is massive
when its median |z| over tokens is at least this many times the median over channels."""


@dataclass
class FeatureResult:
    """DiTF features of one image; maps are (C, h, w) on the token grid, vectors (C,).

    `raw` is the ensemble-mean image-token input of the block; `shift`, `scale`, `gate` that block's AdaLN
    vectors; `discarded` the channels zeroed before the LayerNorm. Only `features` is always set;
    the others are filled when `return_parts=True`.
    """

    features: torch.Tensor
    block: int
    t: float
    discarded: list[int] = field(default_factory=list)
    raw: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    gate: torch.Tensor | None = None


class DiTFeaturizer:
    """DiTF features (Gan et al., NeurIPS 2025) from a diffusers DiT.

    Build from loaded diffusers modules (the family is inferred from the transformer class), or with
    `from_pretrained` from an alias, a hub id, a local folder or a single-file checkpoint. Calling it on
    images returns (B, C, h, w) feature maps at the model's stride (16 px for FLUX).
    """

    def __init__(self, transformer: nn.Module, vae: nn.Module | None = None,
                 text_encoders: Sequence[nn.Module] | None = None, tokenizers: Sequence[Any] | None = None, *,
                 pipeline: Any = None, preset: Preset | None = None):
        self.transformer = transformer.eval()
        self.vae = vae.eval() if vae is not None else None
        self.arch: ArchSpec = arch_for(transformer, vae)
        self.preset = preset
        self.text_pipeline = pipeline if pipeline is not None else self._text_pipeline(text_encoders, tokenizers)
        self._prompt_cache: dict[str, Conditioning] = {}
        self._offload_device: torch.device | None = None

    @classmethod
    def from_pretrained(cls, model: str, *, torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                        block: int | None = None, text_encoder_device: str | torch.device | None = None,
                        offload: Literal["model", "sequential"] | None = None, config: str | None = None,
                        **kwargs: Any) -> "DiTFeaturizer":
        """Load a featurizer from an alias (`flux-dev`, ...), hub id, local folder or single file.

        `block` (global index k) loads only blocks 0..k of the transformer, saving memory when you will
        only tap up to k. `text_encoder_device` keeps the text encoders elsewhere (e.g. `"cpu"`).
        `offload` uses accelerate to keep weights on the CPU and move them to `device` when used.
        `config` is a local folder with `config.json` for single-file checkpoints.
        """
        from ditf.loading import load_components

        components = load_components(model, torch_dtype=torch_dtype, block=block, config=config, **kwargs)
        fx = cls(components.transformer, components.vae, pipeline=components.pipeline, preset=components.preset)
        fx.place(device, text_encoder_device=text_encoder_device, offload=offload)
        return fx

    # ------------------------------------------------------------ placement
    @property
    def device(self) -> torch.device:
        """Device the transformer's computations run on."""
        return self._offload_device or next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point type of the transformer's weights."""
        return next(p.dtype for p in self.transformer.parameters() if p.is_floating_point())

    def place(self, device: str | torch.device | None = None, *, text_encoder_device: str | torch.device | None = None,
              offload: Literal["model", "sequential"] | None = None) -> "DiTFeaturizer":
        """Move the modules to `device` (default: CUDA when available, else CPU), or offload them.

        `offload="sequential"` keeps weights on the CPU and streams each module to `device` when it runs
        (accelerate's `cpu_offload`: least memory, slowest); `"model"` moves whole models on use.
        Text encoders go to `text_encoder_device` (default: `device`).
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        check_dtype_on_device(self.dtype, device)
        modules = [self.transformer] + ([self.vae] if self.vae is not None else [])
        if offload is None:
            for module in modules:
                module.to(device)
            self._offload_device = None
        elif offload in ("model", "sequential"):
            from accelerate import cpu_offload, cpu_offload_with_hook

            for module in modules:
                if offload == "sequential":
                    cpu_offload(module, execution_device=device)
                else:
                    cpu_offload_with_hook(module, execution_device=device)
            self._offload_device = device
        else:
            raise InvalidArgumentError(f"offload={offload!r} is not one of None, 'model', 'sequential'.")
        for encoder in self._text_encoders():
            encoder.to(torch.device(text_encoder_device) if text_encoder_device is not None else device)
        return self

    def release_text_encoders(self) -> None:
        """Free the text encoders; prompts already encoded stay cached, new prompts then need `prompt_embeds`."""
        for name in self._text_encoder_names():
            setattr(self.text_pipeline, name, None)

    # ------------------------------------------------------------ prompts
    def encode_prompt(self, prompt: str | int | None = "") -> Conditioning:
        """Encoded prompt (cached: each distinct prompt runs the text encoders once)."""
        key = repr(prompt)
        if key not in self._prompt_cache:
            unconditional = self.arch.unconditional()
            if self.text_pipeline is None and unconditional is None:
                raise InvalidArgumentError(
                    "this featurizer has no text encoders: pass `prompt_embeds` (and `pooled_prompt_embeds` where "
                    "the model uses them), or build it with `text_encoders` and `tokenizers`."
                )
            if self.text_pipeline is not None and self._text_encoders() == [] and unconditional is None:
                raise InvalidArgumentError(
                    f"prompt {prompt!r} is not cached and the text encoders were released; pass `prompt_embeds`."
                )
            self._warn_truncation(prompt)
            encoder_device = next((e.device for e in self._text_encoders()), self.device)
            with torch.no_grad():
                cond = self.arch.encode_prompt(self.text_pipeline, prompt, encoder_device)
            self._prompt_cache[key] = {k: v.detach() if torch.is_tensor(v) else v for k, v in cond.items()}
        return self._prompt_cache[key]

    def _conditioning(self, prompt: str | int | None, prompt_embeds: torch.Tensor | None,
                      pooled_prompt_embeds: torch.Tensor | None, extra: dict[str, Any]) -> Conditioning:
        if prompt_embeds is None:
            return {**self.encode_prompt(prompt), **extra}
        cond = {"prompt_embeds": prompt_embeds, **extra}
        if pooled_prompt_embeds is not None:
            cond["pooled_prompt_embeds"] = pooled_prompt_embeds
        missing = [k for k in self.arch.conditioning_keys() if k not in cond]
        if missing:
            raise InvalidArgumentError(f"{self.arch.family} needs {', '.join(missing)} alongside prompt_embeds.")
        return cond

    # ------------------------------------------------------------ features
    def __call__(self, images: ImageInput | Sequence[ImageInput], prompt: str | int | None = "", *, t: float | None = None,
                 block: int | None = None, ensemble: int | None = None, discard: Discard = "auto", seed: int | None = 0,
                 generator: torch.Generator | None = None, resolution: int | None = None,
                 size: tuple[int, int] | None = None, pad_square: bool = False, normalize: bool = True,
                 modulate: bool = True, prompt_embeds: torch.Tensor | None = None,
                 pooled_prompt_embeds: torch.Tensor | None = None, guidance: float | None = None,
                 max_batch: int | None = None, vae_sample: VaeSample = "per_member", progress: bool = True,
                 massive_ratio: float = MASSIVE_RATIO, **conditioning: Any) -> torch.Tensor | list[torch.Tensor]:
        """DiTF features of each image: a (B, C, h, w) fp32 tensor on the CPU.

        Images are resized with the long side to `resolution` (sides rounded to the stride) or to `size`
        (height, width). For each image: VAE encode once, `ensemble` noise draws at timestep `t` (0..1000),
        transformer up to block `block`, ensemble mean of the block input, discard, LayerNorm, modulation.
        Defaults come from the model preset. `seed` makes each image's noise depend only on the seed and the
        image (not on its place in the batch); `generator` (CPU) overrides it.
        `vae_sample`: "per_member" draws an independent VAE posterior sample for every ensemble member
        (the authors' procedure, from one encoder pass), "shared" one sample for all, "mode" the posterior mean.
        If the images come out at different sizes, a list of (C, h, w) tensors is returned instead.
        """
        if self.vae is None:
            raise InvalidArgumentError("this featurizer has no VAE; pass latents to `from_latents` instead of images.")
        if vae_sample not in ("per_member", "shared", "mode"):
            raise InvalidArgumentError(f"vae_sample={vae_sample!r} is not one of 'per_member', 'shared', 'mode'.")
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        ensemble = self._default("ensemble", ensemble)
        if resolution is None and size is None:
            resolution = self._default("resolution", None)
        cond = self._conditioning(prompt, prompt_embeds, pooled_prompt_embeds, conditioning)
        results = []
        for image in tqdm(images, desc="DiTF features", unit="image", disable=not progress or len(images) < 2):
            prepared = prepare_image(image, self.arch.stride, resolution=resolution, size=size, pad_square=pad_square)
            rng = generator if generator is not None else torch.Generator().manual_seed(0 if seed is None else seed)
            vae_param = next(self.vae.parameters())
            pixels = prepared.pixels.to(self._offload_device or vae_param.device, vae_param.dtype)
            with torch.no_grad():
                draws = {"per_member": ensemble, "shared": 1, "mode": None}[vae_sample]
                latents = self.arch.encode_images(pixels, draws, rng)
            noise = torch.randn((ensemble, *latents.shape[1:]), generator=rng, dtype=torch.float32)
            result = self.from_latents(latents, noise, t=t, block=block, guidance=guidance, discard=discard,
                                       normalize=normalize, modulate=modulate, max_batch=max_batch,
                                       massive_ratio=massive_ratio, _cond=cond)
            results.append(result.features)
        if len({tuple(r.shape) for r in results}) > 1:
            return results
        return torch.stack(results)

    def from_latents(self, latents: torch.Tensor, noise: torch.Tensor | None = None, *,
                     prompt: str | int | None = "", prompt_embeds: torch.Tensor | None = None,
                     pooled_prompt_embeds: torch.Tensor | None = None, t: float | None = None, block: int | None = None,
                     guidance: float | None = None, discard: Discard = None, return_parts: bool = False,
                     normalize: bool = True, modulate: bool = True, ensemble: int | None = None,
                     generator: torch.Generator | None = None, max_batch: int | None = None,
                     massive_ratio: float = MASSIVE_RATIO, _cond: Conditioning | None = None,
                     **conditioning: Any) -> FeatureResult:
        """DiTF features from clean, normalised latents (1 or E, c, H, W) and noise (E, c, H, W).

        Without `noise`, `ensemble` (default: preset) draws come from `generator` (CPU). The transformer
        runs only up to block `block`, batched `max_batch` ensemble members at a time (default: all).
        `discard` is "auto" (the preset's verified channels, else the channels of this image's block input
        whose median |z| is at least `massive_ratio` times the channel median), a channel list, or None.
        """
        t = self._check_t(self._default("t", t))
        block = self._default("block", block)
        ref = self.arch.block(block)
        cond = _cond if _cond is not None else self._conditioning(prompt, prompt_embeds, pooled_prompt_embeds, conditioning)
        if latents.ndim != 4:
            raise InvalidArgumentError(f"latents must be (1 or E, c, H, W); got shape {tuple(latents.shape)}.")
        if noise is None:
            ensemble = self._default("ensemble", ensemble)
            noise = torch.randn((ensemble, *latents.shape[1:]), generator=generator, dtype=torch.float32)
        if noise.shape[1:] != latents.shape[1:] or latents.shape[0] not in (1, noise.shape[0]):
            raise InvalidArgumentError(
                f"noise {tuple(noise.shape)} does not fit latents {tuple(latents.shape)}: noise must be (E, c, H, W) "
                "and latents (1 or E, c, H, W) with the same c, H, W."
            )
        ensemble = noise.shape[0]
        max_batch = max_batch or ensemble
        if guidance is None and self.preset is not None:
            guidance = self.preset.guidance
        total, parts = None, None
        for start in range(0, ensemble, max_batch):
            stop = min(start + max_batch, ensemble)
            clean = latents if latents.shape[0] == 1 else latents[start:stop]
            noisy = self.arch.noise_latents(clean.float().to(self.device), noise[start:stop].float().to(self.device), t)
            noisy = noisy.to(self.dtype)
            with torch.no_grad(), tap_block(self.arch, ref.index) as captured:
                run_until(lambda: self.arch.run(noisy, t, cond, guidance))
            inputs = captured[0]
            chunk_sum = inputs.image.float().sum(dim=0)
            total = chunk_sum if total is None else total + chunk_sum
            if parts is None:
                parts = inputs
        raw_tokens = total / ensemble
        h, w = self.arch.token_grid(tuple(latents.shape[-2:]))
        shift, scale, gate = (v[0].float() if v.ndim == 2 else v.float().mean(0) for v in (parts.shift, parts.scale, parts.gate))
        channels = self._discard_channels(discard, raw_tokens, massive_ratio)
        feats = ditf_features(raw_tokens, shift.to(raw_tokens.device), scale.to(raw_tokens.device), channels,
                              normalize=normalize, modulate=modulate)
        result = FeatureResult(_to_map(feats, h, w), block=ref.index, t=t, discarded=channels)
        if return_parts:
            result.raw = _to_map(raw_tokens, h, w)
            result.shift, result.scale, result.gate = (v.cpu() for v in (shift, scale, gate))
        return result

    # ------------------------------------------------------------ helpers
    def _discard_channels(self, discard: Discard, raw_tokens: torch.Tensor, massive_ratio: float) -> list[int]:
        width = raw_tokens.shape[-1]
        if discard is None:
            return []
        if isinstance(discard, str):
            if discard != "auto":
                raise InvalidArgumentError(f"discard={discard!r}: use 'auto', a list of channel indices, or None.")
            known = self.preset.massive if self.preset is not None else None
            if known is not None and known.verified and max(known.channels) < width:
                return list(known.channels)
            return detect_ratio(raw_tokens, threshold=massive_ratio)
        return check_channels(list(discard), width)

    def _default(self, name: str, value: Any) -> Any:
        if value is not None:
            return value
        if self.preset is None:
            raise InvalidArgumentError(f"`{name}` is required: this model has no preset to take a default from.")
        return getattr(self.preset, name)

    @staticmethod
    def _check_t(t: float) -> float:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 <= t <= 1000:
            raise InvalidArgumentError(
                f"t={t!r} is outside 0..1000: timesteps are on the 0..1000 scale for every model "
                "(DiTF uses 261 for correspondence, 90 for video)."
            )
        return float(t)

    def _text_encoder_names(self) -> list[str]:
        if self.text_pipeline is None:
            return []
        return [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(self.text_pipeline, n, None) is not None]

    def _text_encoders(self) -> list[nn.Module]:
        return [getattr(self.text_pipeline, n) for n in self._text_encoder_names()]

    def _text_pipeline(self, text_encoders: Sequence[nn.Module] | None, tokenizers: Sequence[Any] | None) -> Any:
        if not text_encoders:
            return None
        import diffusers

        pipeline_cls = getattr(diffusers, self.arch.pipeline_class)
        if len(text_encoders) != len(tokenizers or ()):
            raise InvalidArgumentError(
                f"got {len(text_encoders)} text encoders but {len(tokenizers or ())} tokenizers; pass one tokenizer per encoder."
            )
        suffixes = [""] + [f"_{i}" for i in range(2, len(text_encoders) + 1)]
        parts = {f"text_encoder{s}": e for s, e in zip(suffixes, text_encoders)}
        parts.update({f"tokenizer{s}": tok for s, tok in zip(suffixes, tokenizers)})
        params = inspect.signature(pipeline_cls.__init__).parameters
        unknown = [name for name in parts if name not in params]
        if unknown:
            raise InvalidArgumentError(
                f"{pipeline_cls.__name__} takes no {', '.join(unknown)}: pass the {self.arch.family} text encoders in order."
            )
        required = {n: None for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty}
        return pipeline_cls(**{**required, **parts})

    def _warn_truncation(self, prompt: Any) -> None:
        if not isinstance(prompt, str) or self.text_pipeline is None:
            return
        for name, limit in self.arch.text_limits.items():
            tokenizer = getattr(self.text_pipeline, name, None)
            if tokenizer is None:
                continue
            n_tokens = len(tokenizer(prompt).input_ids)
            if n_tokens > limit:
                warnings.warn(
                    f"prompt has {n_tokens} tokens for {name} ({type(tokenizer).__name__}), which encodes at most "
                    f"{limit}; the rest is cut off. Shorten the prompt.",
                    stacklevel=3,
                )


def _to_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Row-major tokens (N, C) -> feature map (C, h, w) on the CPU."""
    return tokens.reshape(h, w, tokens.shape[-1]).permute(2, 0, 1).contiguous().cpu()


def check_dtype_on_device(dtype: torch.dtype, device: torch.device) -> None:
    """Fail early, with the fix, when `dtype` cannot run on `device` (bf16 on a CPU without support)."""
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_runs_bfloat16():
        raise InvalidArgumentError(
            "torch_dtype=torch.bfloat16 cannot run on this CPU; use torch_dtype=torch.float32 here, or run on a GPU."
        )


def cpu_runs_bfloat16() -> bool:
    """Whether this CPU and torch build can multiply bf16 matrices."""
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16)
        return bool((a @ a).sum().item() == 8)
    except RuntimeError:
        return False
