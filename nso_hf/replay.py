"""What the passes of one micro-batch replay besides the weights: the global generators and the buffers.

Swapping `Trainer` for `NSOTrainer` must change the gradient and nothing else. The weights are moved and
put back by `nso_hf.noise.Perturbation`; a forward also draws from global generators and may write
buffers, and Trainer runs one forward per micro-batch where the step runs several. So, per micro-batch:

- **Generators** (`nso_hf.rng`): every pass starts from the state before the micro-batch (torch CPU and
  CUDA, numpy, Python `random`), so W + U and W - U see the same dropout masks, LayerDrop choices and
  SpecAugment masks; after the micro-batch every stream is where the first pass left it, i.e. where
  one plain pass leaves it.
- **Buffers** (`nso_hf.buffers`): every pass starts from the buffers as they were before the
  micro-batch, and the micro-batch ends with one update: the pass at W's when the plan has one,
  else the gradient-weighted mean of the counted passes'.
- **A pass that raises**: generators and buffers go back to their state before the micro-batch (as
  the weights do, by copy).

Under DDP with `broadcast_buffers`, the buffer broadcast the first forward would make is made before
the buffers are captured (`nso_hf.compat.broadcast_buffers_now`), so every pass starts from rank 0's.
A one-pass plan (method 'none') replays nothing and costs nothing.
"""

from __future__ import annotations

from torch import nn

from nso_hf.buffers import BufferTracker
from nso_hf.compat import broadcast_buffers_now
from nso_hf.passes import Pass
from nso_hf.rng import GlobalRNGState


class PassReplay:
    """One micro-batch: `before(i)` before pass i, `after(i, skipped)` after it, `finish()` after the last.

    `close()` belongs in a `finally`: after a pass raised it puts generators and buffers back to their state
    before the micro-batch; after `finish()` it does nothing.

    Cost: four generator states (about 10 KiB, plus 16 bytes per CUDA device) twice per micro-batch, and the
    buffers' bookkeeping (`nso_hf.buffers`: one copy of the changed buffers, one of the kept update).
    """

    def __init__(self, model: nn.Module, plan: list[Pass], buffers: BufferTracker):
        self.active = len(plan) > 1
        self.finished = False
        if not self.active:
            return
        broadcast_buffers_now(model)
        self.start = GlobalRNGState.capture()
        self.after_first: GlobalRNGState | None = None
        self.buffers = buffers.replay(model, at_w=[p.at_w for p in plan], weights=[p.weight for p in plan])

    def before(self, index: int) -> None:
        if self.active:
            self.start.restore()

    def after(self, index: int, skipped: bool = False) -> None:
        if not self.active:
            return
        if index == 0:
            self.after_first = GlobalRNGState.capture()
        self.buffers.after_pass(index, counted=not skipped)

    def finish(self) -> None:
        self.finished = True
        if self.active:
            self.buffers.finish()
            self.after_first.restore()

    def close(self) -> None:
        if self.active and not self.finished:
            self.finished = True
            self.buffers.abort()
            self.start.restore()
