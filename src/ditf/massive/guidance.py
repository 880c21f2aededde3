"""Detail Guidance (Gan et al. 2025, arXiv 2510.11538) as a hook on any diffusers DiT pipeline.

At every denoising step in the window, the conditional prediction D = D_theta(z_t, t, c) is joined by
a detail-deficient prediction D_m: the same forward pass with the massive channels of block m's image
stream disrupted (zeroed by default). The result is the paper's

    D_hat = D + w (D - D_m)                                       (no unconditional branch)
    D_hat = D + lambda (D - D_uncond) + w (D - D_m)               (CFG, lambda = g - 1)

whatever the pipeline does: diffusers combines CFG as u + g (c - u) = c + (g - 1)(c - u), so when the
pipeline call runs an unconditional branch the conditional prediction receives (w / g)(D - D_m), and the
pipeline's own combination turns it into w (D - D_m). g is read from the pipeline call (the family adapter's
`CfgLayout.scale_argument`, e.g. `guidance_scale` for SD3 and PixArt, `true_cfg_scale` with a negative prompt for
FLUX.1) or, for pipelines ditf does not know, from the pipeline's `guidance_scale` state; with no
unconditional branch (FLUX.1-dev's embedded guidance, `guidance_scale` <= 1) nothing is divided.
Only the conditional branch gets the DG term (as in the paper's formula). Qwen-Image rescales its CFG result
to the norm of the conditional prediction, so there the DG term is approximate.

Not published by the paper, hence parameters without hidden defaults: the layer m, the scale w, the
active step window, the disruption (the ICLR version zeroes; the extended version scales by a
retention rho_t whose schedule is unknown: pass `op=ScaleOp(rho)` with a function of t), and which
channels are massive (default: detected by `RatioRule` on block m's input of the very forward that
D_m repeats, i.e. of the unmodified conditional stream; DiTF's FLUX.1-dev channels are 154 and 1446).
The extended version's "partial forward" (reusing the clean pass up to block m) needs each family's forward
tail, so D_m here is a full second forward pass (twice the cost inside the window).
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
    """Add w (D - D_m) to the pipeline's prediction at the steps in `steps`.

    block: m, the global block index whose input gets the disruption; weight: w (0 reproduces the
    unguided output exactly); channels: the massive channels at block m (see `parse_channels`; detected ones
    come from block m's input of the clean conditional forward); op: the disruption ('zero', 'scale:0.1', an
    `Op`, ...). The CFG scale is read from the pipeline call (see the module docstring); the weight applied to
    the conditional prediction is logged per step (`applied_weight` = w / g under CFG, w without).
    """

    wants_transformer_output = True

    def __init__(self, block: int, weight: float, *, steps: StepSpec = "all", channels: ChannelSpec = "auto",
                 op: Op | str = "zero"):
        super().__init__(blocks=[block], steps=steps, branch="cond")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise InvalidArgumentError(f"weight={weight!r} must be a number (the DG scale w).")
        self.weight = float(weight)
        self.disruption = Edit(parse_op(op) if isinstance(op, str) else op, channels, blocks=[block], steps=steps,
                               branch="detail", reference="live")

    def children(self) -> list[Action]:
        return [self.disruption]

    def input_blocks(self) -> tuple[int, ...]:
        return ()

    def on_transformer_output(self, session: Session, args: tuple, kwargs: dict, output: Any) -> Any:
        state = session.state
        if not self.in_scope(state):
            return None
        if not session.cfg_known:
            raise InvalidArgumentError(
                f"Detail Guidance cannot tell whether {type(session.pipeline).__name__} runs classifier-free guidance "
                "in this call, so it cannot scale its term to mean w: pass intervene(..., cfg_layout=CfgLayout(kind, "
                "scale_argument='<the pipeline argument holding the CFG scale>'))."
            )
        rows = dict(state.rows)["cond"]
        with session.auxiliary("detail"), torch.no_grad():
            degraded = session.transformer(*args, **kwargs)
        prediction, disrupted = _prediction(output), _prediction(degraded)
        weight = self.weight / session.cfg_scale if session.cfg_scale else self.weight
        clean = prediction[rows].float()
        guided = prediction.clone()
        guided[rows] = (clean + weight * (clean - disrupted[rows].float())).to(prediction.dtype)
        self.mark(state, {"run": state.run, "step": state.step, "t": state.t, "cfg_scale": session.cfg_scale,
                          "applied_weight": weight})
        return _with_prediction(output, guided)

    def describe(self) -> dict[str, Any]:
        disruption = self.disruption.describe()
        return {"action": "DetailGuidance", "block": self.blocks[0] if self.blocks else None, "weight": self.weight,
                "disruption": {key: disruption[key] for key in disruption if key != "log"},
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
