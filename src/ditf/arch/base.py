"""What every DiT family adapter must know, and the machinery they share.

An adapter (`ArchSpec` subclass, one file per family in `ditf/arch/`) is bound to one loaded diffusers
transformer. It answers four questions and nothing else is model-specific in ditf:

1. Where are the blocks? `stages` names the transformer's block lists in execution order; the global
   block index k counts through them (FLUX: 19 double-stream blocks, then the single-stream ones).
2. What enters and leaves block k? `read_block_inputs` turns the block's forward-call arguments into
   the image-token residual stream z_k (B, N_img, C), the text stream and that block's AdaLN (shift,
   scale, gate); `read_block_output` finds the image stream in what the block returns.
   `replace_image_input` / `replace_text_input` write changed streams back (interventions).
3. How is an image turned into the model's noisy input? latent normalisation of the VAE, the noise
   convention (flow matching or DDPM), the latent -> token grid geometry.
4. How is the transformer called? `run` builds the model-specific forward arguments from noisy latents,
   a timestep in 0..1000 and an encoded prompt; `cfg_layouts` says how the family's diffusers pipelines
   lay out classifier-free guidance over transformer calls.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from ditf.errors import InvalidArgumentError, UnsupportedLayoutError
from ditf.versions import diffusers_hint

if TYPE_CHECKING:
    from ditf.arch.checkpoints import TensorSource

DEFAULT_DDPM_SCHEDULE: Mapping[str, Any] = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                                            "beta_schedule": "linear"}
"""The DDPM noise schedule of the released DiT and PixArt checkpoints (their scheduler configs)."""
DDPM_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
"""Scheduler-config keys that define a DDPM noise schedule (the rest configure sampling)."""

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


@dataclass(frozen=True)
class CfgLayout:
    """How a pipeline lays out classifier-free guidance over transformer calls and batch rows.

    `none`: one call per step, every row is `cond`. `sequential`: one call per branch in `order`
    (call 0 is `order[0]`, ...); a step with fewer calls simply has fewer branches (no CFG -> only
    `cond`). `batched`: one call whose batch is split in halves `order[0]`, `order[1]` when CFG is on.
    Further calls in a step are `extra`.
    """

    kind: Literal["none", "sequential", "batched"]
    order: tuple[str, ...] = ("cond", "uncond")
    scale_argument: str | None = "guidance_scale"
    """The pipeline-call argument holding the CFG scale g (CFG runs when g > 1); None for a pipeline that runs no
    CFG (its guidance, if any, is embedded in the model, e.g. FLUX.2-dev)."""
    negative_arguments: tuple[str, ...] = ()
    """When not empty, CFG runs only if one of these call arguments is given (FLUX.1's and Qwen-Image's true CFG
    needs a negative prompt)."""

    def cfg_scale(self, arguments: Mapping[str, Any]) -> float | None:
        """The CFG scale g of a pipeline call with `arguments` (its parameters, defaults filled in) when the call runs
        an unconditional branch, else None."""
        if self.kind == "none" or self.scale_argument is None:
            return None
        scale = arguments.get(self.scale_argument)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 1:
            return None
        if self.negative_arguments and all(arguments.get(name) is None for name in self.negative_arguments):
            return None
        return float(scale)

    def rows(self, call: int, batch: int, cfg_active: bool) -> tuple[tuple[str, slice], ...]:
        """Branch -> batch rows of the `call`-th transformer call of a step with `batch` rows."""
        everything = slice(0, batch)
        if self.kind == "none":
            return (("cond" if call == 0 else "extra", everything),)
        if self.kind == "sequential":
            return ((self.order[call] if call < len(self.order) else "extra", everything),)
        if call > 0:
            return (("extra", everything),)
        if not cfg_active:
            return (("cond", everything),)
        half = batch // 2
        return ((self.order[0], slice(0, half)), (self.order[1], slice(half, batch)))


SEQUENTIAL_CFG = CfgLayout("sequential")
"""One transformer call for the conditional prediction, then one for the unconditional one."""
BATCHED_CFG_UNCOND_FIRST = CfgLayout("batched", ("uncond", "cond"))
"""One transformer call on the batch [uncond, cond]."""


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
    cfg_layouts: ClassVar[Mapping[str, CfgLayout]] = {}
    """Per diffusers pipeline class of this family, how its `__call__` lays out classifier-free guidance."""
    block_output_image: ClassVar[int | None] = None
    """Where a block's forward returns the image stream: None when it returns that tensor alone, else its
    position in the returned tuple (1 for diffusers' `(encoder_hidden_states, hidden_states)`)."""
    text_stream_param: ClassVar[str | None] = None
    """The block-forward parameter carrying the text residual stream; None when the family has none (text
    enters by cross-attention as a fixed context, or not at all)."""
    original_layout: ClassVar[str | None] = None
    """Name of the family's original (non-diffusers) single-file checkpoint layout, e.g. Black Forest Labs'
    FLUX.1; None when ditf reads only diffusers-layout single files of this family."""
    original_key_map: ClassVar[Callable[[Mapping[str, Sequence[int]]], dict[str, TensorSource] | None] | None] = None
    """For families with an `original_layout`: checkpoint key -> shape of a file (prefix stripped) in, the
    `TensorSource` of every diffusers key out, or None when the keys are not in that layout."""

    default_vae_sample: ClassVar[str] = "per_member"
    """How latents are drawn from the VAE posterior when the settings do not say: "per_member" (the DiTF
    authors' procedure), "shared" or "mode" (for families whose pipelines use the posterior mean)."""

    def __init__(self, transformer: nn.Module, vae: nn.Module | None = None,
                 scheduler_config: Mapping[str, Any] | None = None):
        self.transformer = transformer
        self.vae = vae
        self.scheduler_config = dict(scheduler_config) if scheduler_config is not None else None
        self.check_layout()

    # ----------------------------------------------------------------- blocks
    def blocks(self) -> list[BlockRef]:
        """All blocks in execution order; `blocks()[k].index == k`."""
        refs = []
        for stage in self.stages:
            for local_index, module in enumerate(getattr(self.transformer, stage)):
                refs.append(BlockRef(len(refs), stage, local_index, module))
        return refs

    def loaded_blocks(self) -> list[BlockRef]:
        """The blocks whose modules were loaded: partial loading (`block=k`) leaves `nn.Identity` after block k."""
        return [ref for ref in self.blocks() if not isinstance(ref.module, nn.Identity)]

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
                    f"{self.family} differently from what ditf supports. {diffusers_hint()}"
                )
            for local_index, block in enumerate(blocks):
                if isinstance(block, nn.Identity):
                    continue
                params = tuple(inspect.signature(block.forward).parameters)[: len(expected)]
                if params != expected:
                    raise UnsupportedLayoutError(
                        f"{type(block).__name__}.forward takes {params} (at {stage}.{local_index}), but the "
                        f"{self.family} adapter expects {expected}. {diffusers_hint()}"
                    )

    # ------------------------------------------------------------ block taps
    @abstractmethod
    def read_block_inputs(self, block: BlockRef, args: tuple, kwargs: dict) -> BlockInputs:
        """Split block k's forward-call arguments into image stream, text stream and AdaLN vectors."""

    def replace_image_input(self, block: BlockRef, args: tuple, kwargs: dict, image: torch.Tensor) -> tuple[tuple, dict]:
        """Return forward-call arguments of `block` with its image stream (B, N_img, C) replaced.

        Default: the block's `hidden_states` argument, positional or keyword, as it came.
        """
        return self._replace_argument(block, args, kwargs, "hidden_states", image)

    def replace_text_input(self, block: BlockRef, args: tuple, kwargs: dict, text: torch.Tensor) -> tuple[tuple, dict]:
        """Return forward-call arguments of `block` with its text stream (B, N_txt, C) replaced.

        Default: the `text_stream_param` argument; families without a text stream raise.
        """
        if self.text_stream_param is None:
            raise UnsupportedLayoutError(
                f"block {block.index} ({block.path}) of this {self.family} model has no text residual stream to write "
                "back; edit tokens='image' instead."
            )
        return self._replace_argument(block, args, kwargs, self.text_stream_param, text)

    def read_block_output(self, block: BlockRef, args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
        """The image stream (B, N_img, C) leaving `block`, read from its forward's return value `output`.

        `args` / `kwargs` are the call as the block received it. Default: `block_output_image` says where.
        """
        position = self.block_output_image
        if position is None and isinstance(output, torch.Tensor):
            return output
        in_tuple = position is not None and isinstance(output, tuple) and len(output) > position
        image = output[position] if in_tuple else None
        if isinstance(image, torch.Tensor):
            return image
        expected = "a tensor" if position is None else f"a tuple with the image stream at position {position}"
        raise UnsupportedLayoutError(
            f"block {block.index} ({block.path}) returned {_describe(output)}, but the {self.family} adapter expects "
            f"{expected}. {diffusers_hint()}"
        )

    def _replace_argument(self, block: BlockRef, args: tuple, kwargs: dict, name: str,
                          value: torch.Tensor) -> tuple[tuple, dict]:
        """`block`'s call with argument `name` (keyword, or positional per `block_forward_params`) set to `value`."""
        if name in kwargs:
            return args, {**kwargs, name: value}
        params = self.block_forward_params[block.stage]
        position = params.index(name) if name in params else len(args)
        if position >= len(args):
            raise UnsupportedLayoutError(
                f"block {block.index} ({block.path}) was called without `{name}`, so a changed stream cannot be "
                f"written back; the {self.family} adapter expects it among {params}."
            )
        return (*args[:position], value, *args[position + 1:]), kwargs

    # ------------------------------------------------------------ pipelines
    def cfg_layout(self, pipeline: Any) -> CfgLayout | None:
        """How `pipeline` lays out classifier-free guidance, or None for a pipeline class ditf does not know.

        Subclasses of a known pipeline class (and `pipeline` given as a class) inherit its layout."""
        cls = pipeline if isinstance(pipeline, type) else type(pipeline)
        for base in cls.__mro__:
            if base.__name__ in self.cfg_layouts:
                return self.cfg_layouts[base.__name__]
        return None

    # ------------------------------------------------------- latents, noise
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: from the VAE's config when one is attached, else the family's usual 8."""
        if self.vae is not None and hasattr(self.vae.config, "block_out_channels"):
            return 2 ** (len(self.vae.config.block_out_channels) - 1)
        return 8

    @property
    def width(self) -> int | None:
        """Channels C of the residual stream (the transformer's `inner_dim`, else heads x head dim; None if unknown)."""
        inner = getattr(self.transformer, "inner_dim", None)
        if isinstance(inner, int):
            return inner
        config = getattr(self.transformer, "config", None)
        heads, head_dim = (getattr(config, name, None) for name in ("num_attention_heads", "attention_head_dim"))
        return heads * head_dim if isinstance(heads, int) and isinstance(head_dim, int) else None

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
        """Noise clean latents x0 (1 or B, c, H, W) with `noise` (B, c, H, W) to timestep t in 0..1000.

        Flow matching: x_t = s * noise + (1 - s) * x0 with s = t / 1000, the definition of the flow time (a
        pipeline's scheduler shifts its *sampling* schedule, which DiTF's t does not follow). DDPM: the
        pipeline's own noise schedule (`DDPMScheduler.from_config(scheduler config).add_noise`) at the integer
        step `ddpm_index(t)`, so a checkpoint whose betas differ stays exact.
        """
        if self.noise_convention == "flow":
            s = t / 1000.0
            return s * noise + (1.0 - s) * x0
        step = torch.tensor([self.ddpm_index(t)], device=x0.device)
        return self.ddpm_scheduler().add_noise(x0, noise, step)

    def ddpm_scheduler(self) -> Any:
        """A `DDPMScheduler` with the noise schedule of the model's pipeline (its scheduler config), or of the
        released DiT / PixArt models (linear betas 1e-4..0.02 over 1000 steps) when no pipeline is attached."""
        if getattr(self, "_ddpm", None) is None:
            from diffusers import DDPMScheduler
            from diffusers.utils import logging as diffusers_logging

            config = self.scheduler_config or DEFAULT_DDPM_SCHEDULE
            wanted = {key: config[key] for key in DDPM_SCHEDULE_KEYS if key in config}
            verbosity = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()  # from_config lists the sampler-only keys it ignores
            try:
                self._ddpm = DDPMScheduler.from_config(wanted)
            finally:
                diffusers_logging.set_verbosity(verbosity)
        return self._ddpm

    def ddpm_index(self, t: float) -> int:
        """Integer DDPM step for t in 0..1000 on the scheduler's training steps (1000 maps to the last step)."""
        steps = int((self.scheduler_config or DEFAULT_DDPM_SCHEDULE).get("num_train_timesteps", 1000))
        return min(int(round(t * steps / 1000.0)), steps - 1)

    def default_guidance(self) -> float | None:
        """The embedded guidance value this model uses when the settings give none; None when it embeds none."""
        return None

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

    def optional_conditioning_keys(self) -> tuple[str, ...]:
        """Keys of `Conditioning` this family's `run` uses when given (e.g. a padding mask)."""
        return ()

    text_limits: ClassVar[dict[str, int]] = {}
    """Per tokenizer attribute of the pipeline, the number of tokens the family encodes (longer is cut)."""

    @abstractmethod
    def encode_prompt(self, pipeline: Any, prompt: str, device: torch.device) -> Conditioning:
        """Encode one prompt with the text stack of `pipeline` (a diffusers pipeline of this family)."""

    def unconditional(self) -> Conditioning | None:
        """Conditioning to use when the family has no text encoder (class-conditional DiT), else None."""
        return None


class PackedLatentsArch(ArchSpec):
    """Families whose pipeline packs latents 2x2 into tokens before the transformer (FLUX.1, Qwen-Image):
    the transformer's `in_channels` are 4 latent channels per token, and one token is a 2x2 latent patch."""

    @property
    def patch_size(self) -> int:
        """Latent cells per token side: the 2x2 packing (whatever the transformer's `patch_size` config says)."""
        return 2

    @property
    def latent_channels(self) -> int:
        """Channels of the unpacked VAE latent: a packed token holds 4 latent cells."""
        return int(self.transformer.config.in_channels) // 4


def patchify_2x2(latents: torch.Tensor) -> torch.Tensor:
    """Fold every 2x2 patch of latents (B, c, H, W) into channels: (B, 4c, H/2, W/2).

    Channel 4 * i + 2 * dy + dx of cell (y, x) is `latents[:, i, 2y + dy, 2x + dx]`, the order of the FLUX
    pipelines' `_pack_latents` (FLUX.1, Qwen-Image) and of FLUX.2's patchified latent.
    """
    batch, channels, height, width = latents.shape
    patches = latents.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(batch, channels * 4, height // 2, width // 2)


def pack_2x2(latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, c, H, W) as row-major tokens (B, H/2 * W/2, 4c) of 2x2 patches (see `patchify_2x2`)."""
    return patchify_2x2(latents).flatten(2).transpose(1, 2).contiguous()


def adaln_single_modulation(table: torch.Tensor, timestep: torch.Tensor,
                            batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shift, scale, gate), each (B, C), of a block's self-attention under adaLN-single (PixArt, Sana).

    The model computes one vector `timestep` (B, 6C) for all blocks; each block adds its own
    `scale_shift_table` (6, C). Rows 0-2 of the sum are shift_msa, scale_msa, gate_msa.
    """
    rows = table[None] + timestep.reshape(batch, 6, -1)
    return rows[:, 0], rows[:, 1], rows[:, 2]


def _describe(value: Any) -> str:
    """A short description of a block's return value for error messages."""
    if isinstance(value, torch.Tensor):
        return f"a tensor {tuple(value.shape)}"
    if isinstance(value, tuple):
        return "a tuple of (" + ", ".join(_describe(v) for v in value) + ")"
    return type(value).__name__


def expand_batch(tensor: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Repeat a (1, ...) tensor to (batch, ...); tensors already of size `batch` pass through."""
    if tensor is None or tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] != 1:
        raise InvalidArgumentError(
            f"a conditioning tensor has batch {tensor.shape[0]}; expected 1 or {batch}. Pass one prompt's embeddings."
        )
    return tensor.expand(batch, *tensor.shape[1:])


def text_prompt(prompt: Any, family: str) -> str:
    """`prompt` as a string for a text-conditioned family; None is the empty prompt, other types are refused."""
    if prompt is None:
        return ""
    if not isinstance(prompt, str):
        raise InvalidArgumentError(f"prompt={prompt!r}: {family} is conditioned on text; pass a string (\"\" for none).")
    return prompt
