"""Detail Guidance (Gan et al. 2025, arXiv 2510.11538) as a hook on any diffusers DiT pipeline.

At every denoising step in the window, the conditional prediction D = D_theta(z_t, t, c) is joined by
a detail-deficient prediction D_m: the same forward pass with the massive channels of block m's image
stream disrupted (zeroed by default). The pipeline then receives

    D_hat = D + w * (D - D_m)                                  (no CFG)

and, when the pipeline also runs classifier-free guidance with scale g (diffusers combines
u + g * (c - u) = c + (g - 1)(c - u)), pass `cfg_scale=g`: the DG term is divided by g before the
pipeline's combination, so the result is the paper's  D + lambda (D - D_uncond) + w (D - D_m)  with
lambda = g - 1. Only the conditional branch gets the DG term (as in the paper's formula).

Not published by the paper, hence parameters without hidden defaults: the layer m, the scale w, the
active step window, the disruption (the ICLR version zeroes; the extended version scales by a
retention rho_t whose schedule is unknown: pass `op=ScaleOp(rho)` with a function of t), and which
channels are massive (default: detected per call by `RatioRule`; DiTF's FLUX.1-dev channels are
154 and 1446). The extended version's "partial forward" (reusing the clean pass up to block m) needs
each family's forward tail, so D_m here is a full second forward pass (twice the cost inside the window).
"""

from __future__ import annotations

from typing import Any

import torch

from ditf.errors import InvalidArgumentError, UnsupportedLayoutError
from ditf.massive.actions import Action, ScopedAction
from ditf.massive.channels import ChannelSpec
from ditf.massive.edits import Edit, Op, parse_op
from ditf.massive.scopes import StepSpec
from ditf.massive.session import Session


class DetailGuidance(ScopedAction):
    """Add w (D - D_m) to the conditional prediction at the steps in `steps`.

    block: m, the global block index whose input gets the disruption; weight: w (0 reproduces the
    unguided output exactly); channels: the massive channels at block m (see `parse_channels`);
    op: the disruption ('zero', 'scale:0.1', an `Op`, ...); cfg_scale: the pipeline's CFG scale g,
    when it runs CFG (see the module docstring).
    """

    wants_transformer_output = True

    def __init__(self, block: int, weight: float, *, steps: StepSpec = "all", channels: ChannelSpec = "auto",
                 op: Op | str = "zero", cfg_scale: float | None = None):
        super().__init__(blocks=[block], steps=steps, branch="cond")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise InvalidArgumentError(f"weight={weight!r} must be a number (the DG scale w).")
        if cfg_scale is not None and not cfg_scale > 0:
            raise InvalidArgumentError(f"cfg_scale={cfg_scale!r} must be > 0 (the pipeline's guidance scale g).")
        self.weight = float(weight)
        self.cfg_scale = cfg_scale
        self.disruption = Edit(parse_op(op) if isinstance(op, str) else op, channels, blocks=[block], steps=steps,
                               branch="detail")

    def children(self) -> list[Action]:
        return [self.disruption]

    def input_blocks(self) -> tuple[int, ...]:
        return ()

    def on_transformer_output(self, session: Session, args: tuple, kwargs: dict, output: Any) -> Any:
        state = session.state
        if not self.in_scope(state):
            return None
        rows = dict(state.rows)["cond"]
        with session.auxiliary("detail"), torch.no_grad():
            degraded = session.transformer(*args, **kwargs)
        prediction, disrupted = _prediction(output), _prediction(degraded)
        weight = self.weight / self.cfg_scale if self.cfg_scale else self.weight
        clean = prediction[rows].float()
        guided = prediction.clone()
        guided[rows] = (clean + weight * (clean - disrupted[rows].float())).to(prediction.dtype)
        self.mark(state, {"step": state.step, "t": state.t, "applied_weight": weight})
        return _with_prediction(output, guided)

    def describe(self) -> dict[str, Any]:
        disruption = self.disruption.describe()
        return {"action": "DetailGuidance", "block": self.blocks[0] if self.blocks else None, "weight": self.weight,
                "cfg_scale": self.cfg_scale, "disruption": {key: disruption[key] for key in disruption if key != "log"},
                "disrupted_channels": [{"step": e["step"], "channels": e["channels"]} for e in self.disruption.log],
                **self.scope(), "applied": self.applied, "log": self.log}


def _prediction(output: Any) -> torch.Tensor:
    """The predicted noise/velocity tensor in a transformer's output (tensor, tuple or `.sample`)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise UnsupportedLayoutError(
        f"the transformer returned {type(output).__name__}, which holds no prediction tensor ditf can find "
        "(expected a tensor, a tuple starting with one, or an object with .sample)."
    )


def _with_prediction(output: Any, prediction: torch.Tensor) -> Any:
    """`output` with its prediction tensor replaced."""
    if isinstance(output, torch.Tensor):
        return prediction
    if isinstance(output, tuple):
        return (prediction, *output[1:])
    if isinstance(output, list):
        return [prediction, *output[1:]]
    output.sample = prediction
    return output


__all__ = ["DetailGuidance"]
