"""Tiny random diffusers models and offline tokenizers, built from configs for the tests.

Every builder returns real diffusers / transformers modules; the tests save them with `save_pretrained`
and load them back through the same path users take. The generic builders live in `ditf.smoke` (the
README's demo uses them too) and are re-exported here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ditf.smoke import (  # noqa: F401  (re-exported for the per-family test builders)
    LETTERS as WORDS,
    build_flux_smoke_pipeline,
    clip_text_encoder,
    clip_tokenizer,
    kl_vae,
    randomize,
    t5_encoder,
    t5_tokenizer,
)

PROMPT = "a photo of a cat"
"""The test prompt; the word-level tiny tokenizers (Gemma, Qwen) are built so that each of its words is one token."""
FIXTURES = Path(__file__).parent / "fixtures"
FLUX_TINY = FIXTURES / "flux_tiny"


def flux_pipeline(folder: Path) -> Path:
    """Save a tiny FLUX.1 pipeline around the flux_tiny fixture transformer (the authors' reference case)."""
    from diffusers import FluxTransformer2DModel

    return build_flux_smoke_pipeline(folder, FluxTransformer2DModel.from_pretrained(FLUX_TINY / "diffusers_transformer"))


def latents_and_noise(shape: tuple[int, int, int, int], ensemble: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded standard-normal clean latents `shape` (1, c, H, W) and noise (ensemble, c, H, W), the same every call."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen), torch.randn((ensemble, *shape[1:]), generator=gen)


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A seeded random RGB image (height, width, 3) in [0, 1]."""
    return np.random.RandomState(seed).rand(height, width, 3)


REFERENCE_TOLERANCE = 2e-5
"""Largest |ours - reference| allowed, relative to max |reference| of the tensor compared. The authors' code and
ours run the same float32 operations, but BLAS kernels (AVX2, AVX-512, ...) sum in different orders on different
CPUs: measured up to 2.3e-7 of the scale on raw block inputs (|z| ~ 400) and 8e-6 after the LayerNorm, which
divides by a standard deviation that the massive channels dominate. Discarding channels changes the features by
1.1 to 2.3 times their scale, five orders of magnitude above this bound."""


def reference_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| / max |reference|: how far a result is from a golden tensor, on its own scale."""
    return float((actual.float() - reference.float()).abs().max() / reference.float().abs().max().clamp(min=1e-12))


FLUX_TINY_MASSIVE = [11, 42]
"""Residual-stream channels of the flux_tiny fixture transformer that carry injected massive activations."""


def leftover_hooks(model) -> list[str]:
    """Names of the submodules of `model` that still hold forward (pre-)hooks."""
    return [name for name, m in model.named_modules() if m._forward_pre_hooks or m._forward_hooks]
