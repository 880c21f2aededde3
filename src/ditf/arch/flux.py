"""FLUX.1 (dev, schnell): `FluxTransformer2DModel`.

Blocks: k = 0..18 are the double-stream `transformer_blocks`, k = 19.. the single-stream
`single_transformer_blocks` (k = 28 is single block 9), as in the DiTF authors' code.

z_k (the DiTF feature tap) is the image-token `hidden_states` the block receives. diffusers (>= 0.35)
passes image and text tokens to single blocks separately, so no slicing is needed.
(shift, scale, gate) is the block's image-stream attention AdaLN: for single blocks
`norm.linear(silu(temb)).chunk(3)`, for double blocks chunks 0-2 of `norm1.linear(silu(temb)).chunk(6)`
(shift_msa, scale_msa, gate_msa). The authors' code taps double blocks after attention (norm2); we use
the block input for every block so that k means the same thing everywhere. Both kinds of block return
`(encoder_hidden_states, hidden_states)`: the text stream, then the image stream.

Latents: the FLUX VAE (16 channels, x8) normalised as `(z - shift_factor) * scaling_factor`, packed 2x2
into 64-channel tokens; noise by flow matching with the timestep passed as t / 1000; FLUX.1-dev embeds
the guidance scale (3.5 by default).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ditf.arch.base import (
    BlockInputs,
    BlockRef,
    CfgLayout,
    Conditioning,
    PackedLatentsArch,
    expand_batch,
    pack_2x2,
    text_prompt,
)
from ditf.arch.checkpoints import TensorSource


FLUX_DEFAULT_GUIDANCE = 3.5
"""`FluxPipeline`'s default guidance scale, which FLUX.1-dev embeds (the DiTF authors' code uses it too)."""


class FluxArch(PackedLatentsArch):
    family = "flux"
    transformer_classes = ("FluxTransformer2DModel",)
    stages = ("transformer_blocks", "single_transformer_blocks")
    block_forward_params = {
        "transformer_blocks": ("hidden_states", "encoder_hidden_states", "temb"),
        "single_transformer_blocks": ("hidden_states", "encoder_hidden_states", "temb"),
    }
    pipeline_class = "FluxPipeline"
    noise_convention = "flow"
    text_limits = {"tokenizer": 77, "tokenizer_2": 512}
    cfg_layouts = {name: CfgLayout("sequential", scale_argument="true_cfg_scale",
                                   negative_arguments=("negative_prompt", "negative_prompt_embeds"))
                   for name in ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")}
    """True CFG (`true_cfg_scale` > 1 with a negative prompt) calls the transformer for cond, then uncond;
    FLUX.1-dev without it makes one call per step (its `guidance_scale` is embedded, not CFG)."""
    block_output_image = 1
    text_stream_param = "encoder_hidden_states"

    def read_block_inputs(self, block: BlockRef, args: tuple, kwargs: dict) -> BlockInputs:
        adaln = block.module.norm1 if block.stage == "transformer_blocks" else block.module.norm
        shift, scale, gate = adaln.linear(F.silu(kwargs["temb"])).chunk(adaln.linear.out_features // self.width, dim=1)[:3]
        return BlockInputs(kwargs["hidden_states"], kwargs["encoder_hidden_states"], shift, scale, gate)

    @property
    def width(self) -> int:
        return self.transformer.inner_dim

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        return (latents - (config.shift_factor or 0.0)) * config.scaling_factor

    def run(self, latents: torch.Tensor, t: float, cond: Conditioning, guidance: float | None = None) -> Any:
        batch = latents.shape[0]
        h, w = self.token_grid(tuple(latents.shape[-2:]))
        tokens = pack_2x2(latents)
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3).to(latents)
        prompt_embeds = expand_batch(cond["prompt_embeds"], batch).to(latents)
        txt_ids = torch.zeros(prompt_embeds.shape[1], 3).to(latents)
        timestep = torch.full((batch,), t / 1000.0, device=latents.device, dtype=latents.dtype)
        guidance_vec = None
        if self.transformer.config.guidance_embeds:
            value = self.default_guidance() if guidance is None else guidance
            guidance_vec = torch.full((batch,), value, device=latents.device, dtype=latents.dtype)
        return self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=expand_batch(cond["pooled_prompt_embeds"], batch).to(latents),
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance_vec,
            return_dict=False,
        )

    def default_guidance(self) -> float | None:
        """FluxPipeline's default `guidance_scale` (3.5) for guidance-distilled checkpoints (dev); None for schnell."""
        return FLUX_DEFAULT_GUIDANCE if self.transformer.config.guidance_embeds else None

    def conditioning_keys(self) -> tuple[str, ...]:
        return ("prompt_embeds", "pooled_prompt_embeds")

    def encode_prompt(self, pipeline: Any, prompt: str, device: torch.device) -> Conditioning:
        prompt = text_prompt(prompt, "FLUX")
        prompt_embeds, pooled, _ = pipeline.encode_prompt(prompt=prompt, prompt_2=None, device=device, max_sequence_length=512)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    original_layout: ClassVar[str] = "Black Forest Labs FLUX.1 (img_in, double_blocks.N, single_blocks.N, final_layer)"
    """The layout of single-file checkpoints released outside diffusers, as `ditf.single_file` names it."""

    @staticmethod
    def original_key_map(shapes: Mapping[str, Sequence[int]]) -> dict[str, TensorSource] | None:
        """diffusers key -> `TensorSource` for a BFL-layout checkpoint with these key shapes; None for other layouts."""
        return bfl_flux_key_map(shapes) if is_bfl_flux_checkpoint(shapes) else None


# ---------------------------------------------------------------- original (Black Forest Labs) checkpoints
# Single-file FLUX.1 checkpoints (flux1-dev.safetensors, ComfyUI files) keep BFL's own module names. The map
# below is width-generic: D comes from `img_in.weight` and each single block's MLP width from its `linear1`.

BFL_MARKER_KEYS = ("img_in.weight", "double_blocks.0.img_mod.lin.weight")
"""Keys whose presence identifies a checkpoint in Black Forest Labs' FLUX.1 layout."""

_BFL_EMBEDDERS = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_BFL_DOUBLE_BLOCK = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_BFL_DOUBLE_QK_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_BFL_DOUBLE_QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_BFL_SINGLE_BLOCK = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
_BFL_SINGLE_QK_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}


def is_bfl_flux_checkpoint(keys: Collection[str]) -> bool:
    """True when checkpoint `keys` (any `model.diffusion_model.` prefix already stripped) are BFL FLUX.1 names."""
    return all(key in keys for key in BFL_MARKER_KEYS)


def bfl_flux_key_map(shapes: Mapping[str, Sequence[int]]) -> dict[str, TensorSource]:
    """Where every `FluxTransformer2DModel` tensor lies in a BFL-layout checkpoint, for any width.

    `shapes` maps the checkpoint's keys (prefix stripped) to tensor shapes; the result maps diffusers keys
    to their `TensorSource`. Fused projections become row ranges (dim 0): `*_attn.qkv` -> q, k, v of D rows
    each; single blocks' `linear1` -> q, k, v (D rows each) and the MLP input (the remaining rows). The final
    layer's AdaLN is stored (shift, scale) by BFL and (scale, shift) by diffusers, so its halves are swapped.
    Checkpoint keys outside the FLUX.1 layout get no entry (the loader reports them).
    """
    width = int(shapes["img_in.weight"][0])
    suffixes = ("weight", "bias")
    sources: dict[str, TensorSource] = {}

    def whole(bfl: str, diffusers_name: str) -> None:
        for suffix in suffixes:
            if f"{bfl}.{suffix}" in shapes:
                sources[f"{diffusers_name}.{suffix}"] = TensorSource(f"{bfl}.{suffix}")

    def rows(bfl: str, diffusers_names: Sequence[str], sizes: Sequence[int]) -> None:
        for suffix in suffixes:
            if f"{bfl}.{suffix}" not in shapes:
                continue
            start = 0
            for name, size in zip(diffusers_names, sizes):
                sources[f"{name}.{suffix}"] = TensorSource(f"{bfl}.{suffix}", start, start + size)
                start += size

    for bfl, name in _BFL_EMBEDDERS.items():
        whole(bfl, name)
    for suffix in suffixes:
        if f"final_layer.adaLN_modulation.1.{suffix}" in shapes:
            sources[f"norm_out.linear.{suffix}"] = TensorSource(f"final_layer.adaLN_modulation.1.{suffix}", swap_halves=True)

    for i in _block_indices(shapes, "double_blocks"):
        bfl_block, block = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for bfl, name in _BFL_DOUBLE_BLOCK.items():
            whole(f"{bfl_block}.{bfl}", f"{block}.{name}")
        for bfl, names in _BFL_DOUBLE_QKV.items():
            rows(f"{bfl_block}.{bfl}", [f"{block}.{n}" for n in names], [width] * 3)
        for bfl, name in _BFL_DOUBLE_QK_NORMS.items():
            if f"{bfl_block}.{bfl}" in shapes:
                sources[f"{block}.{name}"] = TensorSource(f"{bfl_block}.{bfl}")

    for i in _block_indices(shapes, "single_blocks"):
        bfl_block, block = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        for bfl, name in _BFL_SINGLE_BLOCK.items():
            whole(f"{bfl_block}.{bfl}", f"{block}.{name}")
        linear1 = shapes.get(f"{bfl_block}.linear1.weight")
        if linear1 is not None:
            mlp_width = int(linear1[0]) - 3 * width
            rows(f"{bfl_block}.linear1", [f"{block}.attn.to_q", f"{block}.attn.to_k", f"{block}.attn.to_v", f"{block}.proj_mlp"],
                 [width, width, width, mlp_width])
        for bfl, name in _BFL_SINGLE_QK_NORMS.items():
            if f"{bfl_block}.{bfl}" in shapes:
                sources[f"{block}.{name}"] = TensorSource(f"{bfl_block}.{bfl}")
    return sources


def convert_bfl_flux_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole BFL-layout FLUX.1 state dict converted to `FluxTransformer2DModel` keys (any width).

    A `model.diffusion_model.` prefix is stripped first. Shapes are those of the diffusers modules, e.g. the
    fused qkv (3D, D) becomes three (D, D) tensors.
    """
    prefix = "model.diffusion_model."
    state = {key.removeprefix(prefix): tensor for key, tensor in state_dict.items()}
    key_map = bfl_flux_key_map({key: tuple(tensor.shape) for key, tensor in state.items()})
    return {name: source.take(state[source.key]) for name, source in key_map.items()}


def _block_indices(shapes: Mapping[str, Sequence[int]], stage: str) -> list[int]:
    """Sorted block numbers N present as `{stage}.N.` in the checkpoint keys."""
    return sorted({int(key.split(".")[1]) for key in shapes if key.startswith(f"{stage}.")})
