"""Which forward+backward passes one micro-batch runs, and the weight of each.

The accumulated gradient of a micro-batch is the weighted sum of its passes' gradients:
    lam * g(W) + (1 - lam) / (2k) * sum_j [g(W + U_j) + g(W - U_j)]     (two-point, NSO)
    lam * g(W) + (1 - lam) / k    * sum_j  g(W + U_j)                   (one-point, RWP)
    g(W + e),  e = rho * g(W) / ||g(W)||  (ASAM: element-wise |W| weighting)  (SAM, ASAM)
    g(W)                                                                (none: plain Trainer)
The weights sum to 1, so with sigma = 0 (rho = 0) the sum is exactly g(W). SAM's first pass at W
only finds e: its gradient is never accumulated (its `weight` is 0 and it runs no backward into
`.grad`). Flat-LoRA and merged-space NSO have the plans of RWP and NSO; only where the noise goes differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nso_hf.config import ASCENT_METHODS, NSOConfig


@dataclass(frozen=True)
class Pass:
    """One forward+backward pass: at W + sign * U_draw (draw None: at W), gradient weighted by `weight`.

    `ascent`: SAM's pass at W whose gradient g gives the direction e and is not accumulated.
    `ascended`: SAM's pass at W + e, whose gradient is.
    """

    draw: int | None
    sign: int
    weight: float
    ascent: bool = False
    ascended: bool = False

    @property
    def at_w(self) -> bool:
        """The weights hold W during this pass (lam's clean pass, SAM's ascent pass, method 'none')."""
        return self.draw is None and not self.ascended

    @property
    def clean(self) -> bool:
        """At W, with its gradient accumulated (lam's pass, or method 'none')."""
        return self.draw is None and not self.ascent and not self.ascended


def pass_plan(config: NSOConfig) -> list[Pass]:
    """The passes of one micro-batch, in the order they run.

    Args:
        config: the step's settings.

    Returns:
        nso / rwp / flat_lora / nso_merged: 2k passes (k one-point), plus a clean pass first when
        `unperturbed_weight` > 0; a pass we do not use is never planned (the paper's code always runs
        the clean pass, even at lam = 0). sam / asam: the ascent pass at W, then the pass at W + e.
        none: one clean pass.
    """
    if config.method == "none":
        return [Pass(draw=None, sign=0, weight=1.0)]
    if config.method in ASCENT_METHODS:
        return [Pass(draw=None, sign=0, weight=0.0, ascent=True), Pass(draw=None, sign=1, weight=1.0, ascended=True)]
    lam = float(config.unperturbed_weight)
    signs = (1, -1) if config.is_two_point else (1,)
    weight = (1.0 - lam) / (len(signs) * config.num_perturbations)
    plan = [Pass(draw=None, sign=0, weight=lam)] if lam > 0 else []
    plan += [Pass(draw=j, sign=s, weight=weight) for j in range(config.num_perturbations) for s in signs]
    return plan


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def scale_gradient(loss: torch.Tensor, scale: float) -> torch.Tensor:
    """`loss` unchanged in value, with its gradient multiplied by `scale`.

    Weighting the gradient rather than the loss keeps the value Trainer logs the plain loss of the
    pass, and keeps the weighting exact (a power-of-two weight such as 1/2 scales every gradient
    bit-exactly, which is why sigma = 0 reproduces Trainer).

    Args:
        loss: a scalar loss with a graph.
        scale: the pass's weight.

    Returns:
        A tensor equal to `loss` whose backward sends `scale * d loss`.
    """
    if scale == 1.0:
        return loss
    return _ScaleGradient.apply(loss, scale)
