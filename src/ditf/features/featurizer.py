"""`DiTFeaturizer`: DiTF dense features from any supported diffusers DiT."""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ditf.arch import ArchSpec, BlockInputs, Conditioning, arch_for
from ditf.channels import check_channels, detect_massive_channels
from ditf.errors import InvalidArgumentError
from ditf.features.postprocess import ditf_features
from ditf.features.preprocess import ImageInput, PreparedImage, prepare_image
from ditf.registry import Preset
from ditf.settings import (
    SETTING_NAMES,
    FeatureSettings,
    check_setting_names,
    default_dtype,
    dtype_name,
    resolve_settings,
    torch_dtype,
)
from ditf.taps import run_until, tap_blocks

Offload = Literal["model", "sequential"]


@dataclass
class FeatureResult:
    """DiTF features of one image; maps are (C, h, w) on the token grid, vectors (C,).

    `raw` is the ensemble-mean image-token input of the block; `shift`, `scale`, `gate` that block's AdaLN
    vectors; `discarded` the channels zeroed before the LayerNorm; `settings` what the features were computed
    with. `features`, `block`, `t`, `discarded` and `settings` are always set; the others when
    `return_parts=True`.
    """

    features: torch.Tensor
    block: int
    t: float
    discarded: list[int] = field(default_factory=list)
    settings: FeatureSettings | None = None
    raw: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    gate: torch.Tensor | None = None


@dataclass(frozen=True)
class NoisyLatents:
    """One image on its way into the transformer: `prepared` (the resized pixels and sizes), `clean` latents
    (1 or E, c, H, W; E posterior samples or the mode), `noise` (E, c, H, W), fp32 on the CPU."""

    prepared: PreparedImage
    clean: torch.Tensor
    noise: torch.Tensor


class DiTFeaturizer:
    """DiTF features (Gan et al., NeurIPS 2025) from a diffusers DiT.

    Build from loaded diffusers modules (the family is inferred from the transformer class), or with
    `from_pretrained` from an alias, a hub id, a local folder or a single-file checkpoint. Calling it on
    images returns one (C, h, w) feature map per image at the model's stride (16 px for FLUX). What the
    features are computed with is a `FeatureSettings`: the model preset's defaults, changed by keyword
    arguments (`t=`, `block=`, ...) or given whole (`settings=`).
    """

    def __init__(self, transformer: nn.Module, vae: nn.Module | None = None,
                 text_encoders: Sequence[nn.Module] | None = None, tokenizers: Sequence[Any] | None = None, *,
                 pipeline: Any = None, preset: Preset | None = None, model: str | None = None):
        self.transformer = transformer.eval()
        self.vae = vae.eval() if vae is not None else None
        scheduler = getattr(pipeline, "scheduler", None)
        self.arch: ArchSpec = arch_for(transformer, vae, getattr(scheduler, "config", None))
        self.preset = preset
        self.model = model
        """The model reference the featurizer was loaded from (alias, hub id or path), recorded in its settings."""
        self.text_pipeline = pipeline if pipeline is not None else self._text_pipeline(text_encoders, tokenizers)
        self._prompt_cache: dict[str, Conditioning] = {}
        self._offload_device: torch.device | None = None
        self._offload_hooks: list[tuple[nn.Module, Any]] = []

    @classmethod
    def from_pretrained(cls, model: str, *, torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                        block: int | None = None, text_encoder_device: str | torch.device | None = None,
                        offload: Offload | None = None, config: str | None = None, variant: str | None = None,
                        token: str | None = None, revision: str | None = None) -> DiTFeaturizer:
        """Load a featurizer from an alias (`flux-dev`, ...), hub id, local folder or single file.

        `block` (global index k) loads only blocks 0..k of the transformer, saving memory when you will
        only tap up to k. `text_encoder_device` keeps the text encoders elsewhere (e.g. `"cpu"`).
        `offload` uses accelerate to keep weights on the CPU and move them to `device` when used.
        `config` is a local folder with `config.json` for single-file checkpoints; `variant` picks weight files
        such as `*.fp16.safetensors`; `token` and `revision` go to the hub.
        """
        from ditf.loading import load_components

        components = load_components(model, torch_dtype=torch_dtype, block=block, config=config, variant=variant,
                                     token=token, revision=revision)
        fx = cls(components.transformer, components.vae, pipeline=components.pipeline, preset=components.preset,
                 model=model)
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
              offload: Offload | None = None) -> DiTFeaturizer:
        """Move the modules to `device` (default: CUDA when available, else CPU), or offload them.

        `offload="sequential"` keeps weights on the CPU and streams each module to `device` when it runs
        (accelerate's `cpu_offload`: least memory, slowest); `"model"` moves a whole model (text encoders, VAE,
        transformer) to `device` when it runs and the others back to the CPU, and all of them back to the CPU
        when a call returns. Text encoders go to `text_encoder_device` (default: `device`).
        """
        device = check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        check_dtype_on_device(self.dtype, device)
        if offload not in (None, "model", "sequential"):
            raise InvalidArgumentError(f"offload={offload!r} is not one of None, 'model', 'sequential'.")
        modules = [self.transformer] + ([self.vae] if self.vae is not None else [])
        encoders = self._text_encoders()
        self._offload_hooks = []
        if offload is None:
            for module in modules:
                module.to(device)
            for encoder in encoders:
                encoder.to(torch.device(text_encoder_device) if text_encoder_device is not None else device)
            self._offload_device = None
            return self
        from accelerate import cpu_offload, cpu_offload_with_hook

        if text_encoder_device is None:
            modules += encoders
        else:
            for encoder in encoders:
                encoder.to(torch.device(text_encoder_device))
        for module in modules:
            if offload == "sequential":
                cpu_offload(module, execution_device=device)
            else:
                self._offload_hooks.append((module, cpu_offload_with_hook(module, execution_device=device)[1]))
        self._offload_device = device
        return self

    def _activate(self, module: nn.Module | None) -> None:
        """Under `offload="model"`: move every other offloaded model back to the CPU before `module` runs (None:
        all of them, when a call returns). Nothing otherwise."""
        for other, hook in self._offload_hooks:
            if other is not module:
                hook.offload()

    def release_text_encoders(self) -> None:
        """Free the text encoders; prompts already encoded stay cached, new prompts then need `prompt_embeds`."""
        for name in self._text_encoder_names():
            setattr(self.text_pipeline, name, None)
        self._offload_hooks = [(m, h) for m, h in self._offload_hooks if m in (self.transformer, self.vae)]

    # ------------------------------------------------------------ settings
    def settings(self, settings: FeatureSettings | None = None, **overrides: Any) -> FeatureSettings:
        """The complete settings a call with these arguments uses: `settings` (default: this model's preset
        defaults, see `ditf.resolve_settings`) changed by `overrides`, with the model reference, dtype and the
        family's defaults for `guidance` and `vae_sample` filled in."""
        if settings is None:
            resolved = resolve_settings(self.preset, model=self.model, **overrides)
        else:
            resolved = settings.replace(**overrides) if overrides else settings
        if resolved.model is not None and self.model is not None and resolved.model != self.model:
            raise InvalidArgumentError(
                f"these settings were resolved for model {resolved.model!r}, but this featurizer holds {self.model!r}; "
                f"resolve them with fx.settings(...) or change `model` with settings.replace(model={self.model!r})."
            )
        if resolved.dtype is not None and resolved.dtype != dtype_name(self.dtype):
            raise InvalidArgumentError(
                f"settings.dtype={resolved.dtype!r}, but this featurizer's weights are {dtype_name(self.dtype)}; load "
                f"the model with torch_dtype for {resolved.dtype!r} or change the settings."
            )
        if self.arch.noise_convention == "ddpm" and not float(resolved.t).is_integer():
            raise InvalidArgumentError(
                f"t={resolved.t:g}: {self.arch.family} runs integer DDPM timesteps; pass a whole number (e.g. "
                f"{int(resolved.t)} or {int(resolved.t) + 1})."
            )
        filled = {"model": resolved.model or self.model, "dtype": dtype_name(self.dtype),
                  "guidance": resolved.guidance if resolved.guidance is not None else self.arch.default_guidance(),
                  "vae_sample": resolved.vae_sample or self.arch.default_vae_sample}
        changed = {name: value for name, value in filled.items() if getattr(resolved, name) != value}
        if not changed:
            return resolved
        sources = {**resolved.sources, **{name: f"{self.arch.family} family default" for name in changed
                                           if name in ("guidance", "vae_sample")}}
        return dataclasses.replace(resolved, **changed, sources=sources)

    def _split_options(self, options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Keyword arguments -> (settings fields, extra conditioning tensors); anything else is refused."""
        keys = self.arch.conditioning_keys() + self.arch.optional_conditioning_keys()
        conditioning_keys = set(keys) - {"prompt_embeds", "pooled_prompt_embeds"}
        settings = {k: v for k, v in options.items() if k in SETTING_NAMES}
        extra = {k: v for k, v in options.items() if k in conditioning_keys}
        unknown = sorted(set(options) - set(settings) - set(extra))
        if unknown:
            check_setting_names(unknown, also=("prompt_embeds", "pooled_prompt_embeds", *sorted(conditioning_keys),
                                               "generator", "max_batch", "progress", "settings"))
        return settings, extra

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
            encoders = self._text_encoders()
            encoder_device = self._offload_device or next((e.device for e in encoders), self.device)
            self._activate(encoders[0] if len(encoders) == 1 else None)
            with torch.no_grad():
                cond = self.arch.encode_prompt(self.text_pipeline, prompt, encoder_device)
            self._prompt_cache[key] = {k: v.detach() if torch.is_tensor(v) else v for k, v in cond.items()}
        return self._prompt_cache[key]

    def conditioning(self, prompt: str | int | None = "", prompt_embeds: torch.Tensor | None = None,
                     pooled_prompt_embeds: torch.Tensor | None = None, **extra: torch.Tensor) -> Conditioning:
        """What the transformer is conditioned on: the encoded `prompt`, or the given `prompt_embeds` (with
        `pooled_prompt_embeds` and the family's other `extra` tensors, e.g. `prompt_attention_mask`)."""
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
    def __call__(self, images: ImageInput | Sequence[ImageInput], prompt: str | int | None = None, *,
                 settings: FeatureSettings | None = None, prompt_embeds: torch.Tensor | None = None,
                 pooled_prompt_embeds: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 max_batch: int | None = None, progress: bool = True,
                 **options: Any) -> list[torch.Tensor] | list[dict[int, torch.Tensor]]:
        """DiTF features of each image: a list of (C, h, w) fp32 tensors on the CPU, one per image; with several
        blocks (`block=[k1, k2, ...]`, all from one forward pass per image) a list of {block: (C, h, w)}.

        `options` are `FeatureSettings` fields (`t`, `block`, `ensemble`, `resolution`, `size`, `discard`, ...)
        changing `settings` (default: the model preset's); see `FeatureSettings` for each. For each image: VAE
        encode once, `ensemble` noise draws at timestep `t` (0..1000), transformer up to block `block`, ensemble
        mean of the block input, discard, LayerNorm, modulation. `seed` makes each image's noise depend only on
        the seed and the image (not on its place in the list); `generator` (CPU) overrides it.
        """
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        resolved, cond = self._call_settings(prompt, settings, prompt_embeds, pooled_prompt_embeds, options)
        bar = dict(unit="image", disable=not progress or len(images) < 2)
        with self._offloaded_call():
            # All images through the VAE first, then all through the transformer: under offload="model" each
            # model moves to the device once per call.
            latents = [self.noisy_latents(image, resolved, generator=generator)
                       for image in tqdm(images, desc="encoding", **bar)]
            return [_maps(self._features(one.clean, one.noise, resolved, cond, max_batch, return_parts=False))
                    for one in tqdm(latents, desc="DiTF features", **bar)]

    def extract(self, image: ImageInput, prompt: str | int | None = None, *, settings: FeatureSettings | None = None,
                prompt_embeds: torch.Tensor | None = None, pooled_prompt_embeds: torch.Tensor | None = None,
                generator: torch.Generator | None = None, max_batch: int | None = None, return_parts: bool = False,
                **options: Any) -> FeatureResult | dict[int, FeatureResult]:
        """DiTF features of one image with everything that describes them (`FeatureResult`: the map, the
        discarded channels, the settings; with `return_parts` the raw block input and its AdaLN vectors); with
        several blocks, {block: FeatureResult} from one forward pass."""
        resolved, cond = self._call_settings(prompt, settings, prompt_embeds, pooled_prompt_embeds, options)
        with self._offloaded_call():
            latents = self.noisy_latents(image, resolved, generator=generator)
            return self._features(latents.clean, latents.noise, resolved, cond, max_batch, return_parts)

    def noisy_latents(self, image: ImageInput, settings: FeatureSettings, *,
                      generator: torch.Generator | None = None) -> NoisyLatents:
        """The image resized by `settings` (resolution or size, pad_square), VAE-encoded once into clean latents
        (`settings.vae_sample`: E posterior samples, one shared sample, or the mode) and E = `settings.ensemble`
        noise draws, all from `generator` (default: a CPU generator seeded with `settings.seed`)."""
        if self.vae is None:
            raise InvalidArgumentError("this featurizer has no VAE; pass latents to `from_latents` instead of images.")
        prepared = prepare_image(image, self.arch.stride, resolution=settings.resolution, size=settings.size,
                                 pad_square=settings.pad_square)
        rng = generator if generator is not None else torch.Generator().manual_seed(settings.seed)
        vae_param = next(self.vae.parameters())
        pixels = prepared.pixels.to(self._offload_device or vae_param.device, vae_param.dtype)
        draws = {"per_member": settings.ensemble, "shared": 1, "mode": None}[settings.vae_sample or "per_member"]
        self._activate(self.vae)
        with torch.no_grad():
            clean = self.arch.encode_images(pixels, draws, rng)
        noise = torch.randn((settings.ensemble, *clean.shape[1:]), generator=rng, dtype=torch.float32)
        return NoisyLatents(prepared, clean.float().cpu(), noise)

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
        """Clean latents (1 or B, c, H, W) noised with `noise` (B, c, H, W) to timestep t (0..1000) by the
        family's convention, on the transformer's device and in its dtype."""
        noisy = self.arch.noise_latents(clean.float().to(self.device), noise.float().to(self.device), t)
        return noisy.to(self.dtype)

    def forward(self, noisy: torch.Tensor, t: float, cond: Conditioning, guidance: float | None = None, *,
                until: Sequence[int] | None = None) -> dict[int, BlockInputs] | Any:
        """Run the transformer on noisy latents (B, c, H, W) at timestep t (0..1000).

        With `until` (global block indices), return what enters each of those blocks (`BlockInputs`, keyed by
        index) and stop after the deepest one (later blocks never run); without it, run the whole model and
        return its output.
        """
        self._activate(self.transformer)
        with torch.no_grad():
            if until is None:
                return self.arch.run(noisy, t, cond, guidance)
            with tap_blocks(self.arch, until) as captured:
                run_until(lambda: self.arch.run(noisy, t, cond, guidance))
            return captured

    def from_latents(self, latents: torch.Tensor, noise: torch.Tensor | None = None, *,
                     settings: FeatureSettings | None = None, prompt: str | int | None = None,
                     prompt_embeds: torch.Tensor | None = None, pooled_prompt_embeds: torch.Tensor | None = None,
                     generator: torch.Generator | None = None, max_batch: int | None = None,
                     return_parts: bool = False, **options: Any) -> FeatureResult | dict[int, FeatureResult]:
        """DiTF features from clean, normalised latents (1 or E, c, H, W) and noise (E, c, H, W).

        `options` are `FeatureSettings` fields as in `__call__` (the image-size fields are not used). Without
        `noise`, `settings.ensemble` draws come from `generator` (CPU). The transformer runs only up to block
        `block`, batched `max_batch` ensemble members at a time (default: all).
        """
        if noise is not None and settings is None and "ensemble" not in options:
            options = {**options, "ensemble": noise.shape[0]}
        resolved, cond = self._call_settings(prompt, settings, prompt_embeds, pooled_prompt_embeds, options)
        if noise is not None and noise.shape[0] != resolved.ensemble:
            raise InvalidArgumentError(
                f"noise holds {noise.shape[0]} draws but ensemble={resolved.ensemble}; pass one noise draw per member."
            )
        if latents.ndim != 4:
            raise InvalidArgumentError(f"latents must be (1 or E, c, H, W); got shape {tuple(latents.shape)}.")
        if noise is None:
            noise = torch.randn((resolved.ensemble, *latents.shape[1:]), generator=generator, dtype=torch.float32)
        with self._offloaded_call():
            return self._features(latents, noise, resolved, cond, max_batch, return_parts)

    def _call_settings(self, prompt: str | int | None, settings: FeatureSettings | None,
                       prompt_embeds: torch.Tensor | None, pooled_prompt_embeds: torch.Tensor | None,
                       options: Mapping[str, Any]) -> tuple[FeatureSettings, Conditioning]:
        """A public call's keywords -> (its complete settings, what the transformer is conditioned on)."""
        fields, extra = self._split_options(options)
        if prompt is not None:
            fields["prompt"] = prompt
        resolved = self.settings(settings, **fields)
        return resolved, self.conditioning(resolved.prompt, prompt_embeds, pooled_prompt_embeds, **extra)

    @contextmanager
    def _offloaded_call(self) -> Iterator[None]:
        """Under `offload="model"`, every model goes back to the CPU when the block ends, even on an error."""
        try:
            yield
        finally:
            self._activate(None)

    def _features(self, latents: torch.Tensor, noise: torch.Tensor, settings: FeatureSettings, cond: Conditioning,
                  max_batch: int | None, return_parts: bool) -> FeatureResult | dict[int, FeatureResult]:
        """The features of every block of `settings.block` from one forward pass per batch of ensemble members
        (stopping after the deepest block): a `FeatureResult`, or {block: FeatureResult} for several blocks, each
        with its own AdaLN, discarded channels and single-block settings."""
        if noise.ndim != 4 or noise.shape[1:] != latents.shape[1:] or latents.shape[0] not in (1, noise.shape[0]):
            raise InvalidArgumentError(
                f"noise {tuple(noise.shape)} does not fit latents {tuple(latents.shape)}: noise must be (E, c, H, W) "
                "and latents (1 or E, c, H, W) with the same c, H, W."
            )
        ensemble = noise.shape[0]
        if max_batch is None:
            max_batch = ensemble
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InvalidArgumentError(f"max_batch={max_batch!r} must be a whole number >= 1 (None: all members at once).")
        refs = {k: self.arch.block(k) for k in settings.blocks}
        totals: dict[int, torch.Tensor] = {}
        parts: dict[int, BlockInputs] = {}
        for start in range(0, ensemble, max_batch):
            stop = min(start + max_batch, ensemble)
            clean = latents if latents.shape[0] == 1 else latents[start:stop]
            noisy = self.add_noise(clean, noise[start:stop], settings.t)
            captured = self.forward(noisy, settings.t, cond, settings.guidance, until=[r.index for r in refs.values()])
            for ref in refs.values():
                chunk_sum = captured[ref.index].image.float().sum(dim=0)
                totals[ref.index] = chunk_sum if ref.index not in totals else totals[ref.index] + chunk_sum
                parts.setdefault(ref.index, captured[ref.index])
        h, w = self.arch.token_grid(tuple(latents.shape[-2:]))
        results = {}
        for k, ref in refs.items():
            raw_tokens = totals[ref.index] / ensemble
            inputs = parts[ref.index]
            shift, scale, gate = (v[0].float() if v.ndim == 2 else v.float().mean(0)
                                  for v in (inputs.shift, inputs.scale, inputs.gate))
            channels = self._discard_channels(settings, raw_tokens)
            feats = ditf_features(raw_tokens, shift.to(raw_tokens.device), scale.to(raw_tokens.device), channels,
                                  normalize=settings.normalize, modulate=settings.modulate)
            one = settings if len(refs) == 1 else dataclasses.replace(settings, block=k)
            result = FeatureResult(_to_map(feats, h, w), block=ref.index, t=settings.t, discarded=channels, settings=one)
            if return_parts:
                result.raw = _to_map(raw_tokens, h, w)
                result.shift, result.scale, result.gate = (v.cpu() for v in (shift, scale, gate))
            results[k] = result
        return results[settings.block] if len(refs) == 1 else results

    # ------------------------------------------------------------ helpers
    def _discard_channels(self, settings: FeatureSettings, raw_tokens: torch.Tensor) -> list[int]:
        width = raw_tokens.shape[-1]
        if settings.discard is None:
            return []
        if settings.discard == "auto":
            known = self.preset.massive if self.preset is not None else None
            if known is not None and known.verified and max(known.channels) < width:
                return list(known.channels)
            return detect_massive_channels(raw_tokens, settings.massive_ratio)
        return sorted(check_channels(settings.discard, width, name="discard channels"))

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


def load_featurizer(model: str, *, device: str, dtype: str | None = None, block: int | None = None,
                    offload: Offload | None = None, config: str | None = None,
                    variant: str | None = None) -> DiTFeaturizer:
    """The one way ditf loads a model for features: `model` checked first (`ditf.loading.check_model`: every
    component there and readable), its weights in `dtype` ("fp32", "bf16", "fp16"; default bf16 on CUDA, fp32
    elsewhere), only blocks 0..`block` (all when None), a hub model at the commit its identity names (the commit
    the feature caches are keyed by), on `device` or offloaded."""
    from ditf.fingerprint import model_identity
    from ditf.loading import check_model

    check_model(model, needs=("transformer", "vae"), config=config)
    identity = model_identity(model, config=config)
    revision = identity.get("revision") if identity["kind"] == "hub" else None
    return DiTFeaturizer.from_pretrained(model, torch_dtype=torch_dtype(dtype or default_dtype(device), device),
                                         device=device, block=block, offload=offload, config=config,
                                         variant=variant, revision=revision)


def _maps(result: FeatureResult | dict[int, FeatureResult]) -> torch.Tensor | dict[int, torch.Tensor]:
    """The feature map of a result, or {block: map} of several."""
    return result.features if isinstance(result, FeatureResult) else {k: r.features for k, r in result.items()}


def _to_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Row-major tokens (N, C) -> feature map (C, h, w) on the CPU."""
    return tokens.reshape(h, w, tokens.shape[-1]).permute(2, 0, 1).contiguous().cpu()


def check_device(device: str | torch.device, what: str = "device") -> torch.device:
    """`device` as a torch device this process can use; errors name `what` and the fix (a malformed name, CUDA
    asked of a build or machine without it, a GPU index that does not exist)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InvalidArgumentError(f"{what}={str(device)!r} is not a device; use cpu, cuda or cuda:N.") from err
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise InvalidArgumentError(
                f"{what}={str(device)!r}: {build}. Use cpu, or install a CUDA build of torch (e.g. "
                "DITF_TORCH=torch ./run.sh ...) on a machine with a GPU."
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InvalidArgumentError(
                f"{what}={str(device)!r}: this machine has {torch.cuda.device_count()} CUDA devices (0.."
                f"{torch.cuda.device_count() - 1})."
            )
    elif parsed.type not in ("cpu", "mps", "xpu", "meta"):
        raise InvalidArgumentError(f"{what}={str(device)!r}: ditf runs on cpu or cuda (mps, xpu where torch has them).")
    return parsed


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
