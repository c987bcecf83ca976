"""Scheduler adapters: the guided model output <-> x0 for each diffusers scheduler and parameterisation."""

from qsilk.sampling.adapters import (
    ADAPTERS,
    SUPPORTED_SCHEDULERS,
    SchedulerAdapter,
    StepPoint,
    UnsupportedSchedulerError,
    ZeroTerminalSNRError,
    adapter_for,
    alpha_coefficients,
    alpha_sigma_coefficients,
    flow_coefficients,
    karras_coefficients,
    output_to_x0,
    x0_delta_to_output,
)

__all__ = [
    "ADAPTERS",
    "SUPPORTED_SCHEDULERS",
    "SchedulerAdapter",
    "StepPoint",
    "UnsupportedSchedulerError",
    "ZeroTerminalSNRError",
    "adapter_for",
    "alpha_coefficients",
    "alpha_sigma_coefficients",
    "flow_coefficients",
    "karras_coefficients",
    "output_to_x0",
    "x0_delta_to_output",
]
