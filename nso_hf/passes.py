"""Which forward+backward passes one micro-batch runs, and the weight of each.

The accumulated gradient of a micro-batch is the weighted sum of its passes' gradients:
    lam * g(W) + (1 - lam) / (2k) * sum_j [g(W + U_j) + g(W - U_j)]     (two-point, NSO)
    lam * g(W) + (1 - lam) / k    * sum_j  g(W + U_j)                   (one-point, RWP)
The weights sum to 1, so with sigma = 0 the sum is exactly g(W).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nso_hf.config import NSOConfig


@dataclass(frozen=True)
class Pass:
    """One forward+backward pass: at W + sign * U_draw (draw None: at W), gradient weighted by `weight`."""

    draw: int | None
    sign: int
    weight: float

    @property
    def clean(self) -> bool:
        return self.draw is None


def pass_plan(config: NSOConfig) -> list[Pass]:
    """The passes of one micro-batch, in the order they run.

    Args:
        config: the NSO settings.

    Returns:
        2k passes (k one-point), plus a clean pass first when `unperturbed_weight` > 0; a pass we do
        not use is never planned (the paper's code always runs the clean pass, even at lam = 0).
    """
    lam = float(config.unperturbed_weight)
    signs = (1, -1) if config.two_point else (1,)
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
