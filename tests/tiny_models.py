"""Tiny random diffusers models and offline tokenizers, built from configs for the tests.

Every builder returns real diffusers / transformers modules; the tests save them with `save_pretrained`
and load them back through the same path users take. The generic builders live in `ditf.smoke` (the
README's demo uses them too) and are re-exported here.
"""

from __future__ import annotations

from pathlib import Path

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

FIXTURES = Path(__file__).parent / "fixtures"
FLUX_TINY = FIXTURES / "flux_tiny"


def flux_pipeline(folder: Path) -> Path:
    """Save a tiny FLUX.1 pipeline around the flux_tiny fixture transformer (the authors' reference case)."""
    from diffusers import FluxTransformer2DModel

    return build_flux_smoke_pipeline(folder, FluxTransformer2DModel.from_pretrained(FLUX_TINY / "diffusers_transformer"))
