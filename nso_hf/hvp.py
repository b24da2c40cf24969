"""Moved to `nso_hf.flatness.hvp` (the products) and `nso_hf.flatness.context` (selection, batches,
loss, reduction); this module keeps the 0.1 import path."""

from nso_hf.flatness.context import (
    PARAMETER_SETS,
    LossFn,
    all_reduce_mean,
    batch_loss,
    distributed_world_size,
    input_device,
    mean_loss,
    move_to_device,
    prepare_measurement,
    select_measured_parameters,
)
from nso_hf.flatness.hvp import HVP_METHODS, FiniteDifferenceHessian, HessianOperator, finite_difference_step

__all__ = [
    "HVP_METHODS",
    "PARAMETER_SETS",
    "FiniteDifferenceHessian",
    "HessianOperator",
    "LossFn",
    "all_reduce_mean",
    "batch_loss",
    "distributed_world_size",
    "finite_difference_step",
    "input_device",
    "mean_loss",
    "move_to_device",
    "prepare_measurement",
    "select_measured_parameters",
]
