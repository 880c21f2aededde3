"""What every DiT family adapter must know, and the machinery they share.

An adapter (`ArchSpec` subclass, one file per family in `ditf/arch/`) is bound to one loaded diffusers
transformer. It answers four questions and nothing else is model-specific in ditf:

1. Where are the blocks? `stages` names the transformer's block lists in execution order; the global
   block index k counts through them (FLUX: 19 double-stream blocks, then the single-stream ones).
2. What enters block k? `read_block_inputs` turns the block's forward-call arguments into the
   image-token residual stream z_k (B, N_img, C) and that block's AdaLN (shift, scale, gate).
   `replace_image_input` writes a changed image stream back (interventions).
3. How is an image turned into the model's noisy input? latent normalisation of the VAE, the noise
   convention (flow matching or DDPM), the latent -> token grid geometry.
4. How is the transformer called? `run` builds the model-specific forward arguments from noisy latents,
   a timestep in 0..1000 and an encoded prompt.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ditf.errors import InvalidArgumentError, UnsupportedLayoutError

Conditioning = dict[str, Any]
"""An encoded prompt: keyword tensors for the adapter's `run` (e.g. `prompt_embeds`, `pooled_prompt_embeds`)."""


@dataclass(frozen=True)
class BlockRef:
    """One transformer block, addressed both by its global index and by its place in the module tree."""

    index: int
    """Global block index k over all of the model's blocks in execution order."""
    stage: str
    """Attribute of the transformer holding the block list, e.g. `single_transformer_blocks`."""
    local_index: int
    """Position of the block inside its stage's list."""
    module: nn.Module

    @property
    def path(self) -> str:
        """Module path inside the transformer, e.g. `single_transformer_blocks.9`."""
        return f"{self.stage}.{self.local_index}"


@dataclass
class BlockInputs:
    """What a block receives, split into the parts DiTF and the massive-activation tools use.

    `image` is (B, N_img, C), the image-token residual stream entering the block; `text` is
    (B, N_txt, C) for blocks that carry a text stream, else None. `shift`, `scale`, `gate` are the
    block's image-stream AdaLN vectors, (B, C) (or (B, N_img, C) for families with per-token
    modulation); the block itself computes `(1 + scale) * LayerNorm(image) + shift`.
    """

    image: torch.Tensor
    text: torch.Tensor | None
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class ArchSpec(ABC):
    """Adapter for one DiT family; instantiate with a loaded diffusers transformer."""

    family: ClassVar[str]
    """Short family name used in presets and messages, e.g. `flux`."""
    transformer_classes: ClassVar[tuple[str, ...]]
    """Names of the diffusers transformer classes this adapter handles."""
    stages: ClassVar[tuple[str, ...]]
    """Attributes of the transformer holding block lists, in execution order."""
    block_forward_params: ClassVar[dict[str, tuple[str, ...]]]
    """Per stage, the leading parameter names of the block's `forward` this adapter relies on."""
    pipeline_class: ClassVar[str]
    """Name of the diffusers pipeline whose `encode_prompt` encodes prompts for this family."""
    noise_convention: ClassVar[str]
    """`flow` (x_t = s * noise + (1 - s) * x0 with s = t / 1000) or `ddpm` (alphas_cumprod)."""

    def __init__(self, transformer: nn.Module, vae: nn.Module | None = None):
        self.transformer = transformer
        self.vae = vae
        self.check_layout()

    # ----------------------------------------------------------------- blocks
    def blocks(self) -> list[BlockRef]:
        """All blocks in execution order; `blocks()[k].index == k`."""
        refs = []
        for stage in self.stages:
            for local_index, module in enumerate(getattr(self.transformer, stage)):
                refs.append(BlockRef(len(refs), stage, local_index, module))
        return refs

    def num_blocks(self) -> int:
        """Number of blocks k can address (the model's real depth, loaded or not)."""
        return len(self.blocks())

    def block_layout(self) -> str:
        """Human-readable map of global indices onto module lists, e.g. `0-18 transformer_blocks, ...`."""
        parts, start = [], 0
        for stage in self.stages:
            n = len(getattr(self.transformer, stage))
            parts.append(f"{start}-{start + n - 1} = {stage}[0-{n - 1}]")
            start += n
        return "; ".join(parts)

    def block(self, k: int) -> BlockRef:
        """The block with global index k (negative counts from the end); errors name the valid range."""
        refs = self.blocks()
        n = len(refs)
        if isinstance(k, bool) or not isinstance(k, int) or not -n <= k < n:
            raise InvalidArgumentError(
                f"block={k!r} is out of range for this {self.family} model: valid blocks are 0..{n - 1} "
                f"({self.block_layout()})."
            )
        ref = refs[k % n]
        if isinstance(ref.module, nn.Identity):
            raise InvalidArgumentError(
                f"block={k} ({ref.path}) was not loaded: this model was loaded only up to an earlier block. "
                f"Load it again with `block={k}` (or without `block`) to read block {k}."
            )
        return ref

    def check_layout(self) -> None:
        """Fail loudly when a block's forward signature is not the one this adapter was written for."""
        for stage, expected in self.block_forward_params.items():
            blocks = getattr(self.transformer, stage, None)
            if blocks is None:
                raise UnsupportedLayoutError(
                    f"{type(self.transformer).__name__} has no `{stage}`: this diffusers version lays out "
                    f"{self.family} differently from what ditf supports (diffusers>=0.35,<0.43)."
                )
            real = [b for b in blocks if not isinstance(b, nn.Identity)]
            if not real:
                continue
            params = tuple(inspect.signature(real[0].forward).parameters)[: len(expected)]
            if params != expected:
                raise UnsupportedLayoutError(
                    f"{type(real[0]).__name__}.forward takes {params}, but the {self.family} adapter expects "
                    f"{expected}. Install a supported diffusers version (>=0.35,<0.43)."
                )

    # ------------------------------------------------------------ block taps
    @abstractmethod
    def read_block_inputs(self, block: BlockRef, args: tuple, kwargs: dict) -> BlockInputs:
        """Split block k's forward-call arguments into image stream, text stream and AdaLN vectors."""

    @abstractmethod
    def replace_image_input(self, block: BlockRef, args: tuple, kwargs: dict, image: torch.Tensor) -> tuple[tuple, dict]:
        """Return forward-call arguments of `block` with its image stream (B, N_img, C) replaced."""

    # ------------------------------------------------------- latents, noise
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: from the VAE's config when one is attached, else the family's usual 8."""
        if self.vae is not None and hasattr(self.vae.config, "block_out_channels"):
            return 2 ** (len(self.vae.config.block_out_channels) - 1)
        return 8

    @property
    def patch_size(self) -> int:
        """Latent cells per token side."""
        return int(self.transformer.config.patch_size)

    @property
    def stride(self) -> int:
        """Pixels per feature-map cell (image sizes are rounded to a multiple of this)."""
        return self.vae_scale_factor * self.patch_size

    @property
    def latent_channels(self) -> int:
        """Channels of the (unpacked) latent the VAE produces."""
        return int(self.transformer.config.in_channels)

    def token_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Token grid (h, w) for an unpacked latent of size (H, W); tokens are row-major over it."""
        return latent_hw[0] // self.patch_size, latent_hw[1] // self.patch_size

    @abstractmethod
    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Map raw latents (B, c, H, W) of the attached VAE into the transformer's latent space."""

    def encode_images(self, pixels: torch.Tensor, num_samples: int | None,
                      generator: torch.Generator | None) -> torch.Tensor:
        """Encode pixels (1, 3, H, W) in [-1, 1] with the attached VAE, once, into normalised latents.

        `num_samples=None` returns the posterior mode (1, c, h, w); otherwise `num_samples` posterior
        samples (num_samples, c, h, w), all from one encoder pass, with noise from `generator` (CPU).
        """
        dist = self.vae.encode(pixels).latent_dist
        if num_samples is None:
            raw = dist.mode()
        else:
            eps = torch.randn((num_samples, *dist.mean.shape[1:]), generator=generator, dtype=torch.float32)
            raw = dist.mean + dist.std * eps.to(dist.mean.device, dist.mean.dtype)
        return self.normalize_latents(raw)

    def noise_latents(self, x0: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
        """Noise clean latents x0 (1 or B, c, H, W) with `noise` (B, c, H, W) to timestep t in 0..1000."""
        if self.noise_convention == "flow":
            s = t / 1000.0
            return s * noise + (1.0 - s) * x0
        alpha_bar = self.ddpm_alphas_cumprod()[self.ddpm_index(t)].item()
        return alpha_bar ** 0.5 * x0 + (1.0 - alpha_bar) ** 0.5 * noise

    @staticmethod
    def ddpm_alphas_cumprod() -> torch.Tensor:
        """alphas_cumprod (1000,) of the linear beta schedule 1e-4..0.02 used by DiT and PixArt."""
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        return torch.cumprod(1.0 - betas, dim=0)

    @staticmethod
    def ddpm_index(t: float) -> int:
        """Integer DDPM timestep for t in 0..1000 (1000 maps to the last step, 999)."""
        return min(int(round(t)), 999)

    # ------------------------------------------------------------ forward
    @contextmanager
    def forward_context(self) -> Iterator[None]:
        """Context to hold around transformer forwards that a caller other than `run` drives (a diffusers
        pipeline under interventions), for families whose block taps need per-call facts (FLUX.2: the text
        length). Nothing for most families."""
        yield

    @abstractmethod
    def run(self, latents: torch.Tensor, t: float, cond: Conditioning, guidance: float | None = None) -> Any:
        """Call the transformer on noisy latents (B, c, H, W) at timestep t in 0..1000.

        `cond` holds tensors with batch 1 or B; they are expanded to B.
        """

    # ------------------------------------------------------------ prompts
    def conditioning_keys(self) -> tuple[str, ...]:
        """Keys of `Conditioning` this family's `run` needs."""
        return ("prompt_embeds",)

    text_limits: ClassVar[dict[str, int]] = {}
    """Per tokenizer attribute of the pipeline, the number of tokens the family encodes (longer is cut)."""

    @abstractmethod
    def encode_prompt(self, pipeline: Any, prompt: str, device: torch.device) -> Conditioning:
        """Encode one prompt with the text stack of `pipeline` (a diffusers pipeline of this family)."""

    def unconditional(self) -> Conditioning | None:
        """Conditioning to use when the family has no text encoder (class-conditional DiT), else None."""
        return None


def expand_batch(tensor: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Repeat a (1, ...) tensor to (batch, ...); tensors already of size `batch` pass through."""
    if tensor is None or tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] != 1:
        raise InvalidArgumentError(
            f"a conditioning tensor has batch {tensor.shape[0]}; expected 1 or {batch}. Pass one prompt's embeddings."
        )
    return tensor.expand(batch, *tensor.shape[1:])
