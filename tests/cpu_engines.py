"""Test-only patches that let Trainer run FSDP1, FSDP2 and DeepSpeed ZeRO on CPU processes (gloo).

Nothing here is needed on GPUs; it exists so the sharded engines are exercised in the default
test suite on a machine without one. Both patches are taken from how accelerate picks its backend:
- FSDP: accelerate switches to FSDP only for GPU-type backends, so on CPU a Trainer with an
  `fsdp` config silently runs DDP. After `AcceleratorState.__init__`, a MULTI_CPU state that was
  given an `fsdp_plugin` is set to FSDP (device `cpu`: FSDP1 rejects `cpu:0`).
- DeepSpeed: with `use_cpu=False` and no GPU, accelerate finds no backend and every process
  believes it is alone. With `DS_ACCELERATOR=cpu`, gloo/MULTI_CPU is returned instead, and
  accelerate then selects DeepSpeed from `ACCELERATE_USE_DEEPSPEED` as it does on GPUs.
"""

from __future__ import annotations

import os

import torch


def patch_accelerate_for_cpu_engines() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if getattr(PartialState, "_nso_cpu_patched", False):
        return
    prepare_backend = PartialState._prepare_backend

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        found, kind = prepare_backend(self, cpu, sagemaker_dp, backend)
        launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
        if kind == DistributedType.NO and launched and os.environ.get("DS_ACCELERATOR") == "cpu":
            return "gloo", DistributedType.MULTI_CPU
        return found, kind

    init = AcceleratorState.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = plugin
            self.device = torch.device("cpu")
            PartialState._shared_state["device"] = torch.device("cpu")

    PartialState._prepare_backend = _prepare_backend
    AcceleratorState.__init__ = __init__
    PartialState._nso_cpu_patched = True
