"""Model output <-> x0 for diffusers schedulers: one small table, as k-diffusion's ``external.py`` does for models.

Every supported scheduler step computes its x0 prediction as an affine function of the model output::

    x0 = c_skip * sample + c_out * model_output

with scalars that depend on the scheduler's parameterisation (``prediction_type``) and its noise level at the
current call. An adapter reads those scalars from the scheduler's own state (``alphas_cumprod[t]``, ``sigmas``,
``step_index``, its sigma -> (alpha_t, sigma_t) map) *before* the step runs, so the wrapped step can hand the
scheduler a model output whose x0 is the stabilised one. The inverse is applied as a delta,
``out' = out + (x0' - x0) / c_out``, so elements QSilk leaves alone stay bit-identical.

Families:
- ``alpha``: DDIM, DDPM, PNDM. x_t = sqrt(a) x0 + sqrt(1 - a) eps with a = alphas_cumprod[t].
- ``karras``: Euler, Euler-ancestral, LMS, Heun, KDPM2. x = x0 + sigma eps (unscaled sample; the pipeline scales
  the model input). Heun and KDPM2 make two calls per step (timesteps hold two entries per step).
- ``multistep``: DPM-Solver++ (multistep / singlestep), UniPC, DEIS. The scheduler's ``_sigma_to_alpha_sigma_t``
  covers both VP and flow (``use_flow_sigmas``) configs; ``flow_prediction`` is x0 = x - sigma v.
- ``flow``: FlowMatchEuler (SD3, Flux): x0 = x - sigma v.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


class UnsupportedSchedulerError(ValueError):
    """The scheduler's class (or its configuration) has no x0 adapter."""


# -- parameterisations: (c_skip, c_out) with x0 = c_skip * sample + c_out * model_output ----------------------------


class ZeroTerminalSNRError(UnsupportedSchedulerError):
    """An epsilon-prediction model at a timestep with alphas_cumprod == 0: x0 is undefined there."""


def alpha_coefficients(alpha_prod: float, prediction_type: str) -> tuple[float, float]:
    """VP models at a discrete timestep: x_t = sqrt(a) x0 + sqrt(1 - a) eps, a = alphas_cumprod[t].

    At a = 0 (zero terminal SNR, ``rescale_betas_zero_snr=True``) v- and sample-prediction stay finite
    (v: x0 = -v); epsilon-prediction has no x0 there and raises :class:`ZeroTerminalSNRError`."""
    a, b = math.sqrt(alpha_prod), math.sqrt(1.0 - alpha_prod)
    if prediction_type == "epsilon":
        if a == 0.0:
            raise ZeroTerminalSNRError(
                "alphas_cumprod is 0 at this timestep (zero terminal SNR, e.g. rescale_betas_zero_snr=True with "
                "trailing spacing): an epsilon-prediction model carries no information about x0 there "
                "(x0 = (x - sqrt(1 - a) eps) / sqrt(a) divides by 0). Zero-SNR schedules need a v_prediction "
                "model; for an epsilon model set rescale_betas_zero_snr=False."
            )
        return 1.0 / a, -b / a
    if prediction_type == "v_prediction":
        return a, -b
    if prediction_type == "sample":
        return 0.0, 1.0
    raise UnsupportedSchedulerError(f"prediction_type {prediction_type!r} is not supported for VP schedulers")


def karras_coefficients(sigma: float, prediction_type: str) -> tuple[float, float]:
    """k-diffusion / Euler-family schedulers, sample unscaled: x = x0 + sigma eps."""
    if prediction_type == "epsilon":
        return 1.0, -sigma
    if prediction_type == "v_prediction":
        return 1.0 / (sigma**2 + 1.0), -sigma / math.sqrt(sigma**2 + 1.0)
    if prediction_type in ("sample", "original_sample"):
        return 0.0, 1.0
    raise UnsupportedSchedulerError(
        f"prediction_type {prediction_type!r} is not supported for sigma schedulers"
    )


def alpha_sigma_coefficients(
    alpha_t: float, sigma_t: float, sigma: float, prediction_type: str
) -> tuple[float, float]:
    """DPM-Solver / UniPC / DEIS: x = alpha_t x0 + sigma_t eps (VP or flow sigmas); flow_prediction: x0 = x - sigma v."""
    if prediction_type == "epsilon":
        return 1.0 / alpha_t, -sigma_t / alpha_t
    if prediction_type == "v_prediction":
        return alpha_t, -sigma_t
    if prediction_type == "sample":
        return 0.0, 1.0
    if prediction_type == "flow_prediction":
        return 1.0, -sigma
    raise UnsupportedSchedulerError(
        f"prediction_type {prediction_type!r} is not supported for multistep schedulers"
    )


def flow_coefficients(sigma: float) -> tuple[float, float]:
    """Rectified flow: x = (1 - sigma) x0 + sigma noise, model predicts v = noise - x0, so x0 = x - sigma v."""
    return 1.0, -sigma


# -- the x0 <-> model output maps ----------------------------------------------------------------------------------


def output_to_x0(sample: Tensor, output: Tensor, c_skip: float, c_out: float) -> Tensor:
    """x0 = c_skip * sample + c_out * output, in fp32."""
    return c_skip * sample.float() + c_out * output.float()


def x0_delta_to_output(output: Tensor, x0: Tensor, x0_new: Tensor, c_out: float) -> Tensor:
    """Model output whose x0 is ``x0_new``: out + (x0_new - x0) / c_out where they differ, ``output`` elsewhere.

    Elements with x0_new == x0 come back bit-identical (torch.where, not an added zero).
    """
    changed = x0_new.ne(x0)
    moved = output.float() + (x0_new.float() - x0.float()) / c_out
    return torch.where(changed, moved.to(output.dtype), output)


# -- where a call sits in the schedule --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPoint:
    """One scheduler.step call: where it sits in the schedule and its x0 coefficients."""

    index: int  # position of this call in scheduler.timesteps
    step: int  # sampler step number (Heun/KDPM2: both calls of a step share it)
    num_steps: int
    sigma: float | None  # noise level (VE sigma for VP models, flow sigma for flow models)
    c_skip: float
    c_out: float
    phase: int = 0  # 0: first (or only) call of the step, 1: second call (Heun/KDPM2 corrector, PNDM warm-up)

    @property
    def progress(self) -> float:
        return self.step / max(self.num_steps - 1, 1)

    @property
    def is_last(self) -> bool:
        return self.step >= self.num_steps - 1


def _item(x) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _prediction_type(scheduler) -> str:
    return str(getattr(scheduler.config, "prediction_type", "epsilon"))


def _call_index(scheduler, timestep) -> int:
    """The index the scheduler's own step() will use: ``step_index``, or what its ``_init_step_index`` would set."""
    index = getattr(scheduler, "step_index", None)
    if index is None:
        begin = getattr(scheduler, "begin_index", None)
        index = begin if begin is not None else scheduler.index_for_timestep(timestep)
    return int(index)


def _lookup_index(timesteps: Tensor, timestep) -> int:
    """Position of a discrete timestep in the schedule (nearest one if a custom loop passes an off-grid value)."""
    t = torch.as_tensor(timestep, device=timesteps.device).to(timesteps.dtype).reshape(-1)[0]
    return int((timesteps - t).abs().argmin())


def _alpha_point(scheduler, timestep, index: int, step: int, num_steps: int, phase: int = 0) -> StepPoint:
    t = int(_item(timestep))
    alpha_prod = _item(scheduler.alphas_cumprod[t])
    try:
        c_skip, c_out = alpha_coefficients(alpha_prod, _prediction_type(scheduler))
    except ZeroTerminalSNRError as err:
        raise ZeroTerminalSNRError(f"{type(scheduler).__name__} at timestep {t}: {err}") from None
    sigma = math.sqrt((1.0 - alpha_prod) / alpha_prod) if alpha_prod > 0 else math.inf  # pure noise at a = 0
    return StepPoint(index, step, num_steps, sigma, c_skip, c_out, phase)


def locate_ddim(scheduler, timestep) -> StepPoint:
    """DDIM / DDPM: no step counter; the timestep itself indexes the schedule and alphas_cumprod."""
    timesteps = scheduler.timesteps
    index = _lookup_index(timesteps, timestep)
    return _alpha_point(scheduler, timestep, index, index, len(timesteps))


def locate_pndm(scheduler, timestep) -> StepPoint:
    """PNDM (PLMS with skip_prk_steps, SD 1.x's default): ``counter`` counts calls; the first step makes two calls
    (the second one re-evaluates at the predicted sample); x0 is taken at the timestep the model was evaluated at."""
    index = int(scheduler.counter)
    calls = len(scheduler.timesteps)
    if scheduler.config.skip_prk_steps:
        step, num_steps, phase = max(index - 1, 0), max(calls - 1, 1), int(index == 1)
    else:  # PRK warm-up: 4 calls per step for the first 3 steps
        prk = len(scheduler.prk_timesteps)
        step = index // 4 if index < prk else prk // 4 + index - prk
        num_steps, phase = prk // 4 + calls - prk, int(index < prk and index % 4 != 0)
    return _alpha_point(scheduler, timestep, index, step, num_steps, phase)


def locate_karras(scheduler, timestep) -> StepPoint:
    index = _call_index(scheduler, timestep)
    sigma = _item(scheduler.sigmas[index])
    c_skip, c_out = karras_coefficients(sigma, _prediction_type(scheduler))
    return StepPoint(index, index, len(scheduler.timesteps), sigma, c_skip, c_out)


def locate_heun(scheduler, timestep) -> StepPoint:
    """Heun: calls alternate first-order (at sigmas[i]) and corrector (at sigma_next = sigmas[i]) phases; the model
    is evaluated at sigmas[i] in both. ``dt is None`` marks the first-order phase, as in the scheduler."""
    index = _call_index(scheduler, timestep)
    phase = 0 if scheduler.state_in_first_order else 1
    sigma = _item(scheduler.sigmas[index])
    c_skip, c_out = karras_coefficients(sigma, _prediction_type(scheduler))
    num_steps = (len(scheduler.timesteps) + 1) // 2
    return StepPoint(index, index // 2, num_steps, sigma, c_skip, c_out, phase)


def locate_kdpm2(scheduler, timestep) -> StepPoint:
    """KDPM2: the corrector call evaluates the model at the interpolated sigma ``sigmas_interpol[i]``."""
    index = _call_index(scheduler, timestep)
    first = scheduler.state_in_first_order
    sigma = _item(scheduler.sigmas[index] if first else scheduler.sigmas_interpol[index])
    c_skip, c_out = karras_coefficients(sigma, _prediction_type(scheduler))
    num_steps = (len(scheduler.timesteps) + 1) // 2
    return StepPoint(index, index // 2, num_steps, sigma, c_skip, c_out, 0 if first else 1)


def locate_multistep(scheduler, timestep) -> StepPoint:
    """DPM-Solver++ / UniPC / DEIS: the scheduler's own sigma -> (alpha_t, sigma_t) at ``sigmas[step_index]``."""
    index = _call_index(scheduler, timestep)
    sigma_value = scheduler.sigmas[index]
    alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(sigma_value)
    sigma = _item(sigma_value)
    c_skip, c_out = alpha_sigma_coefficients(
        _item(alpha_t), _item(sigma_t), sigma, _prediction_type(scheduler)
    )
    return StepPoint(index, index, len(scheduler.timesteps), sigma, c_skip, c_out)


def locate_flow(scheduler, timestep) -> StepPoint:
    index = _call_index(scheduler, timestep)
    sigma = _item(scheduler.sigmas[index])
    c_skip, c_out = flow_coefficients(sigma)
    return StepPoint(index, index, len(scheduler.timesteps), sigma, c_skip, c_out)


# -- Euler with churn ------------------------------------------------------------------------------------------------


def _peek_noise(draw: Callable[[], Tensor], generator, device: torch.device) -> Tensor:
    """Call ``draw`` (which consumes random numbers) and restore every RNG it may have used, so the scheduler's
    own step draws exactly the same numbers afterwards."""
    generators = generator if isinstance(generator, list) else [generator] if generator is not None else []
    if generators:
        states = [g.get_state() for g in generators]
        try:
            return draw()
        finally:
            for g, state in zip(generators, states, strict=True):
                g.set_state(state)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        return draw()


def euler_churn(scheduler, point: StepPoint, sample: Tensor, step_args: dict) -> tuple[Tensor, StepPoint] | None:
    """``EulerDiscreteScheduler.step(s_churn > 0)`` first adds noise, ``x_hat = x + eps sqrt(sigma_hat^2 - sigma^2)``
    with ``sigma_hat = sigma (1 + gamma)``, and takes x0 from ``x_hat`` (epsilon: ``x_hat - sigma_hat * out``).

    Returns (x_hat, the point with those coefficients), drawing the same noise the step will draw (RNG state
    restored), or None when this call does not churn. ``step_args``: the step's bound arguments."""
    s_churn = float(step_args.get("s_churn", 0.0) or 0.0)
    if s_churn <= 0:
        return None
    sigmas = scheduler.sigmas
    sigma = sigmas[point.index]
    s_tmin, s_tmax = step_args.get("s_tmin", 0.0), step_args.get("s_tmax", float("inf"))
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0:
        return None
    from diffusers.utils.torch_utils import randn_tensor

    model_output, generator = step_args["model_output"], step_args.get("generator")
    noise = _peek_noise(
        lambda: randn_tensor(
            model_output.shape, dtype=model_output.dtype, device=model_output.device, generator=generator
        ),
        generator,
        model_output.device,
    )
    sigma_hat = sigma * (gamma + 1)
    # the same tensor arithmetic as the scheduler, so x_hat matches its own bit for bit
    sample_hat = sample.to(torch.float32) + noise * step_args.get("s_noise", 1.0) * (sigma_hat**2 - sigma**2) ** 0.5
    prediction_type = _prediction_type(scheduler)
    if prediction_type == "epsilon":
        c_skip, c_out = 1.0, -_item(sigma_hat)
    else:  # v: the scheduler keeps sigma's coefficients on x_hat; sample: x0 = out
        c_skip, c_out = karras_coefficients(_item(sigma), prediction_type)
    return sample_hat, dataclasses.replace(point, c_skip=c_skip, c_out=c_out)


# -- the table ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SchedulerAdapter:
    family: str
    locate: Callable[[object, object], StepPoint]
    prediction_types: tuple[str, ...]
    returns_x0: bool  # the step output carries pred_original_sample
    # (scheduler, point, sample, bound step arguments) -> (sample x0 is taken from, point) when a step kwarg
    # changes the x0 formula (Euler's s_churn), else None
    adjust: Callable[[object, StepPoint, Tensor, dict], tuple[Tensor, StepPoint] | None] | None = None


_VP = ("epsilon", "v_prediction", "sample")
_EPS_V = ("epsilon", "v_prediction")  # these schedulers raise on "sample" themselves
ADAPTERS: dict[str, SchedulerAdapter] = {
    "DDIMScheduler": SchedulerAdapter("alpha", locate_ddim, _VP, True),
    "DDPMScheduler": SchedulerAdapter("alpha", locate_ddim, _VP, True),
    "PNDMScheduler": SchedulerAdapter("alpha", locate_pndm, _EPS_V, False),
    "EulerDiscreteScheduler": SchedulerAdapter(
        "karras", locate_karras, _VP + ("original_sample",), True, adjust=euler_churn
    ),
    "EulerAncestralDiscreteScheduler": SchedulerAdapter("karras", locate_karras, _EPS_V, True),
    "LMSDiscreteScheduler": SchedulerAdapter("karras", locate_karras, _VP, True),
    "HeunDiscreteScheduler": SchedulerAdapter("karras", locate_heun, _VP, True),
    "KDPM2DiscreteScheduler": SchedulerAdapter("karras", locate_kdpm2, _EPS_V, True),
    "DPMSolverMultistepScheduler": SchedulerAdapter("multistep", locate_multistep, PREDICTION_TYPES, False),
    "DPMSolverSinglestepScheduler": SchedulerAdapter("multistep", locate_multistep, PREDICTION_TYPES, False),
    "UniPCMultistepScheduler": SchedulerAdapter("multistep", locate_multistep, PREDICTION_TYPES, False),
    "DEISMultistepScheduler": SchedulerAdapter("multistep", locate_multistep, PREDICTION_TYPES, False),
    "FlowMatchEulerDiscreteScheduler": SchedulerAdapter("flow", locate_flow, ("flow",), False),
}
SUPPORTED_SCHEDULERS: tuple[str, ...] = tuple(ADAPTERS)


def adapter_for(scheduler) -> SchedulerAdapter:
    """The adapter for a scheduler instance (matched on its class or a supported base class).

    Raises UnsupportedSchedulerError naming the scheduler and listing the supported ones, or naming an unsupported
    prediction type.
    """
    cls = type(scheduler)
    name = cls.__name__
    adapter = next((ADAPTERS[k.__name__] for k in cls.__mro__ if k.__name__ in ADAPTERS), None)
    if adapter is None:
        raise UnsupportedSchedulerError(
            f"qsilk has no x0 adapter for scheduler {name}; supported schedulers: {', '.join(SUPPORTED_SCHEDULERS)}. "
            "Swap it with e.g. pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)."
        )
    if adapter.family != "flow":
        prediction_type = _prediction_type(scheduler)
        if prediction_type not in adapter.prediction_types:
            raise UnsupportedSchedulerError(
                f"{name} with prediction_type={prediction_type!r} is not supported "
                f"(supported: {', '.join(adapter.prediction_types)})"
            )
    return adapter


__all__ = [
    "ADAPTERS",
    "SUPPORTED_SCHEDULERS",
    "SchedulerAdapter",
    "StepPoint",
    "UnsupportedSchedulerError",
    "ZeroTerminalSNRError",
    "adapter_for",
    "euler_churn",
    "alpha_coefficients",
    "alpha_sigma_coefficients",
    "flow_coefficients",
    "karras_coefficients",
    "output_to_x0",
    "x0_delta_to_output",
]
