"""FLUX.2 (dev, klein): `Flux2Transformer2DModel` with `Flux2Pipeline` (dev) or `Flux2KleinPipeline` (klein).

Blocks: k = 0..n_double-1 are the double-stream `transformer_blocks`, then the single-stream
`single_transformer_blocks` (dev: 8 + 48, k = 8 is single block 0; klein-4B: 5 + 20; klein-9B: 8 + 24).

z_k (the DiTF tap) is the image-token residual stream entering block k, (B, h*w, C). Double blocks get it
as `hidden_states` (text separately). Single blocks get the concatenated `[text, image]` stream as
`hidden_states` with `encoder_hidden_states=None`, so the adapter slices off the first n_txt tokens,
where n_txt is the `encoder_hidden_states` length of the model call; it is recorded by a temporary
pre-hook on the transformer (`forward_context`, entered by `run` and by `intervene`). Changed image and
text streams are written back into their slices. Double blocks return `(encoder_hidden_states,
hidden_states)`; single blocks return the joint `[text, image]` stream, whose image part is their output.
Modulation is shared by all blocks and computed once per call at model level: double blocks receive
`temb_mod_img` (6*C: attention then MLP (shift, scale, gate)), single blocks `temb_mod` (3*C); we use the
attention (first) triple, which the block applies as `(1 + scale) * LayerNorm(z_k) + shift` (eps 1e-6, no
affine). In single blocks the text tokens share it.

Latents: `AutoencoderKLFlux2` (32 channels, x8) latents are patchified 2x2 into 4*32 = 128 channels at x16,
then normalised with the VAE's batch-norm running statistics, `(z - running_mean) / sqrt(running_var + eps)`.
ditf's "latent" for this family is that patchified (B, 128, H/16, W/16) tensor: noise is drawn in it, each
cell is one token (patch size 1), the feature stride is 16 px. Ids have 4 axes (t, h, w, l): image
(0, row, col, 0), text (0, 0, 0, position).

Noise: flow matching, x_t = s * noise + (1 - s) * x0 with s = t / 1000; the `timestep` argument is s. dev
embeds the guidance scale (`guidance_embeds=True`; default: Flux2Pipeline's 4.0); klein has no guidance
embedding. Prompts: dev stacks Mistral-Small-3.1 hidden layers (10, 20, 30), klein Qwen3 layers
(9, 18, 27), 512 tokens, through the pipelines' own `encode_prompt`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from ditf.arch.base import (
    SEQUENTIAL_CFG,
    ArchSpec,
    BlockInputs,
    BlockRef,
    CfgLayout,
    Conditioning,
    expand_batch,
    patchify_2x2,
    text_prompt,
)
from ditf.errors import InvalidArgumentError

MAX_PROMPT_TOKENS = 512
"""`max_sequence_length` both FLUX.2 pipelines encode prompts with (their default)."""


class Flux2Arch(ArchSpec):
    family = "flux2"
    transformer_classes = ("Flux2Transformer2DModel",)
    stages = ("transformer_blocks", "single_transformer_blocks")
    block_forward_params = {
        "transformer_blocks": ("hidden_states", "encoder_hidden_states", "temb_mod_img", "temb_mod_txt"),
        "single_transformer_blocks": ("hidden_states", "encoder_hidden_states", "temb_mod"),
    }
    noise_convention = "flow"
    cfg_layouts = {"Flux2Pipeline": CfgLayout("sequential", scale_argument=None), "Flux2KleinPipeline": SEQUENTIAL_CFG}
    """klein's CFG calls the transformer for cond, then uncond; dev (guidance-distilled) makes one call per step."""
    block_output_image = 1
    text_stream_param = "encoder_hidden_states"

    default_vae_sample = "mode"
    """`Flux2Pipeline` encodes reference images with the posterior mean (`retrieve_latents(..., "argmax")`)."""

    def __init__(self, transformer: torch.nn.Module, vae: torch.nn.Module | None = None,
                 scheduler_config: Mapping[str, Any] | None = None):
        self._text_tokens: int | None = None
        super().__init__(transformer, vae, scheduler_config)

    @property
    def is_klein(self) -> bool:
        """klein (Qwen3 text encoder) has no guidance embedding; dev (Mistral3) has one."""
        return not self.transformer.config.guidance_embeds

    @property
    def pipeline_class(self) -> str:  # type: ignore[override]
        """`Flux2KleinPipeline` for klein, `Flux2Pipeline` for dev: the two encode prompts differently."""
        return "Flux2KleinPipeline" if self.is_klein else "Flux2Pipeline"

    @property
    def text_limits(self) -> dict[str, int]:  # type: ignore[override]
        """klein's Qwen tokenizer takes 512 tokens. dev's `tokenizer` is a Mistral3 processor, which cannot
        count tokens of a bare string, so dev prompts are not checked."""
        return {"tokenizer": MAX_PROMPT_TOKENS} if self.is_klein else {}

    # ------------------------------------------------------------ block taps
    @contextmanager
    def forward_context(self) -> Iterator[None]:
        """Record the text length of every transformer call made inside, so that single-block inputs
        `[text, image]` can be split. The hook is removed on exit."""

        def record(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
            self._text_tokens = text.shape[1]

        outer = self._text_tokens
        handle = self.transformer.register_forward_pre_hook(record, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            self._text_tokens = outer

    def read_block_inputs(self, block: BlockRef, args: tuple, kwargs: dict) -> BlockInputs:
        """z_k (B, N, C), the text stream (B, T, C) and the attention (shift, scale, gate), each (B, C)."""
        if block.stage == "transformer_blocks":
            shift, scale, gate = _attention_modulation(kwargs["temb_mod_img"], sets=2)
        else:
            shift, scale, gate = _attention_modulation(kwargs["temb_mod"], sets=1)
        if self._joint_input(block, kwargs):
            text, image = self._joint_parts(block, kwargs)
            return BlockInputs(image, text, shift, scale, gate)
        return BlockInputs(kwargs["hidden_states"], kwargs["encoder_hidden_states"], shift, scale, gate)

    def replace_image_input(self, block: BlockRef, args: tuple, kwargs: dict, image: torch.Tensor) -> tuple[tuple, dict]:
        """Block k's call with its image stream (B, N, C) replaced (inside `[text, image]` for single blocks)."""
        if not self._joint_input(block, kwargs):
            return super().replace_image_input(block, args, kwargs, image)
        text, _ = self._joint_parts(block, kwargs)
        return args, {**kwargs, "hidden_states": torch.cat([text, image.to(text)], dim=1)}

    def replace_text_input(self, block: BlockRef, args: tuple, kwargs: dict, text: torch.Tensor) -> tuple[tuple, dict]:
        """Block k's call with its text stream (B, T, C) replaced (inside `[text, image]` for single blocks)."""
        if not self._joint_input(block, kwargs):
            return super().replace_text_input(block, args, kwargs, text)
        _, image = self._joint_parts(block, kwargs)
        return args, {**kwargs, "hidden_states": torch.cat([text.to(image), image], dim=1)}

    def read_block_output(self, block: BlockRef, args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
        """The image stream (B, N, C) leaving block k: the image part of a single block's joint output."""
        if block.stage == "transformer_blocks" or isinstance(output, tuple):
            return super().read_block_output(block, args, kwargs, output)
        text = kwargs.get("encoder_hidden_states")
        return output[:, (self._text_length(block) if text is None else text.shape[1]):]

    @staticmethod
    def _joint_input(block: BlockRef, kwargs: dict) -> bool:
        """True when `block` receives text and image concatenated (single blocks as the model calls them)."""
        return block.stage == "single_transformer_blocks" and kwargs.get("encoder_hidden_states") is None

    def _joint_parts(self, block: BlockRef, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(text (B, T, C), image (B, N, C)): the two slices of a single block's joint `[text, image]` input."""
        joint = kwargs["hidden_states"]
        n_txt = self._text_length(block)
        return joint[:, :n_txt], joint[:, n_txt:]

    def _text_length(self, block: BlockRef) -> int:
        if self._text_tokens is None:
            raise InvalidArgumentError(
                f"block {block.index} ({block.path}) receives text and image tokens concatenated, and the text "
                "length of this call is unknown: run the transformer inside `arch.forward_context()` "
                "(`arch.run` and `intervene` do this)."
            )
        return self._text_tokens

    # ------------------------------------------------------- latents, noise
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per (patchified) latent cell: the VAE's 2 ** (levels - 1), times 2 for the 2x2 patchify."""
        if self.vae is not None:
            return 2 ** (len(self.vae.config.block_out_channels) - 1) * 2
        return 16

    @property
    def patch_size(self) -> int:
        """One token per patchified latent cell."""
        return 1

    @property
    def latent_channels(self) -> int:
        """Channels of the patchified latent (4 * VAE channels; 128 for the released models)."""
        return int(self.transformer.config.in_channels)

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (B, c, H, W) -> patchified, batch-norm normalised latents (B, 4c, H/2, W/2)."""
        patches = patchify_2x2(latents)
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(patches)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(patches)
        return (patches - mean) / std

    # ------------------------------------------------------------ forward
    def run(self, latents: torch.Tensor, t: float, cond: Conditioning, guidance: float | None = None) -> Any:
        """Call the transformer on noisy patchified latents (B, c, H, W) at t in 0..1000.

        `guidance` (dev only) defaults to Flux2Pipeline's `guidance_scale` default.
        """
        batch, channels, height, width = latents.shape
        tokens = latents.reshape(batch, channels, height * width).permute(0, 2, 1)
        prompt_embeds = expand_batch(cond["prompt_embeds"], batch).to(latents)
        zero = torch.zeros(1, dtype=torch.long)
        img_ids = torch.cartesian_prod(zero, torch.arange(height), torch.arange(width), zero)
        txt_ids = torch.cartesian_prod(zero, zero, zero, torch.arange(prompt_embeds.shape[1]))
        guidance_vec = None
        if not self.is_klein:
            value = self.default_guidance() if guidance is None else guidance
            guidance_vec = torch.full((batch,), value, device=latents.device, dtype=latents.dtype)
        with self.forward_context():
            return self.transformer(
                hidden_states=tokens,
                encoder_hidden_states=prompt_embeds,
                timestep=torch.full((batch,), t / 1000.0, device=latents.device, dtype=latents.dtype),
                img_ids=img_ids.to(latents.device),
                txt_ids=txt_ids.to(latents.device),
                guidance=guidance_vec,
                return_dict=False,
            )

    def default_guidance(self) -> float | None:
        """dev: `Flux2Pipeline`'s default `guidance_scale` (4.0); klein embeds no guidance."""
        return None if self.is_klein else _pipeline_default_guidance()

    # ------------------------------------------------------------ prompts
    def encode_prompt(self, pipeline: Any, prompt: str, device: torch.device) -> Conditioning:
        """Encode `prompt` with the pipeline's own text stack (Mistral3 for dev, Qwen3 for klein): (1, 512, D)."""
        prompt = text_prompt(prompt, "FLUX.2")
        embeds, _text_ids = pipeline.encode_prompt(prompt=prompt, device=device, max_sequence_length=MAX_PROMPT_TOKENS)
        return {"prompt_embeds": embeds}


def _attention_modulation(mod: torch.Tensor, sets: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shift, scale, gate), each (B, C), of the first of `sets` triples packed in `mod` (B, [1,] sets*3*C)."""
    if mod.ndim == 3 and mod.shape[1] == 1:
        mod = mod[:, 0]
    shift, scale, gate = mod.chunk(3 * sets, dim=-1)[:3]
    return shift, scale, gate


def _pipeline_default_guidance() -> float:
    """`guidance_scale` default of `Flux2Pipeline.__call__` (4.0 in diffusers 0.42)."""
    from diffusers import Flux2Pipeline

    return float(inspect.signature(Flux2Pipeline.__call__).parameters["guidance_scale"].default)
