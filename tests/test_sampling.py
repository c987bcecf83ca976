"""qsilk.sampling: x0 coefficients per parameterisation and the scheduler adapter table, checked against the
schedulers' own x0 (pred_original_sample / converted multistep history) on short synthetic sampling runs."""

import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

sys.path.insert(0, str(Path(__file__).parent))
from qsilk.sampling import (  # noqa: E402
    ADAPTERS,
    SUPPORTED_SCHEDULERS,
    UnsupportedSchedulerError,
    adapter_for,
    alpha_coefficients,
    alpha_sigma_coefficients,
    flow_coefficients,
    karras_coefficients,
    output_to_x0,
    x0_delta_to_output,
)
from tiny_pipelines import FLOW_CAPABLE, SCHEDULERS, make_scheduler  # noqa: E402

torch.set_num_threads(1)

STEPS = 5


def _prediction_types(name):
    return [
        p
        for p in ADAPTERS[SCHEDULERS[name][0]].prediction_types
        if p in ("epsilon", "v_prediction", "sample")
    ]


# (scheduler short name, prediction_type or "flow"): every type each scheduler supports, and the flow configs
CASES = [(name, ptype) for name in SCHEDULERS if name != "flow_euler" for ptype in _prediction_types(name)]
CASES += [("flow_euler", "flow")] + [(name, "flow") for name in FLOW_CAPABLE]


def build(name, ptype):
    return make_scheduler(name, flow=True) if ptype == "flow" else make_scheduler(name, ptype)


def fake_model(x, t):
    """A smooth deterministic stand-in for a denoiser's output (any parameterisation)."""
    return 0.8 * torch.tanh(x) + 0.05 * math.sin(float(t) / 97.0) + 0.1 * x.roll(1, dims=-1)


def schedulers_own_x0(scheduler, result, sample, point):
    """The x0 the scheduler itself used in the step just taken, or None where it does not expose it."""
    if getattr(result, "pred_original_sample", None) is not None:
        return result.pred_original_sample
    name = type(scheduler).__name__
    if name in ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler"):
        return scheduler.model_outputs[-1]  # dpmsolver++ / UniPC(predict_x0) keep converted x0 predictions
    return None


def deis_own_epsilon(scheduler, sample, target, point):
    """DEIS keeps epsilon in its history: (its own eps, the eps the target x0 implies with its alpha_t, sigma_t)."""
    alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[point.index])
    return scheduler.model_outputs[-1], (sample - alpha_t * target) / sigma_t


def run_schedule(scheduler, on_call, steps=STEPS, seed=0):
    """A plain sampling loop; on_call(scheduler, t, x, out) -> (model output to pass, check(result))."""
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen) * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        scaled = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        out = fake_model(scaled, t)
        out, check = on_call(scheduler, t, x, out)
        result = scheduler.step(out, t, x)
        check(result)
        x = result.prev_sample
    return x


def assert_close(actual, expected):
    scale = float(expected.abs().max()) + 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("name, ptype", CASES)
@pytest.mark.parametrize("modify", [False, True], ids=["x0", "x0-modified"])
def test_adapter_x0_matches_the_schedulers_own(name, ptype, modify):
    """x0 from the adapter == the scheduler's own x0; after a delta edit the scheduler sees exactly the edited x0
    and the untouched model-output elements are bit-identical."""
    scheduler = build(name, ptype)
    adapter = adapter_for(scheduler)
    checked = []

    def on_call(sched, t, x, out):
        point = adapter.locate(sched, t)
        x0 = output_to_x0(x, out, point.c_skip, point.c_out)
        target, new_out = x0, out
        if modify:
            mask = torch.rand(x0.shape, generator=torch.Generator().manual_seed(int(point.index))) < 0.3
            target = torch.where(mask, 0.5 * x0 + 0.25, x0)
            new_out = x0_delta_to_output(out, x0, target, point.c_out)
            assert torch.equal(new_out[~mask], out[~mask])

        def check(result):
            own = schedulers_own_x0(sched, result, x, point)
            if own is not None:
                assert_close(own, target)
                checked.append(point.index)
            elif name == "deis":
                assert_close(*deis_own_epsilon(sched, x, target, point))
                checked.append(point.index)
            elif name == "flow_euler":  # Euler step on the velocity implied by the target x0
                sigma, sigma_next = sched.sigmas[point.index], sched.sigmas[point.index + 1]
                assert_close(result.prev_sample, target + sigma_next * (x - target) / sigma)
                checked.append(point.index)
            elif name == "pndm" and point.index == 0:  # first PLMS call is a DDIM step from (x0, eps)
                t_prev = int(t) - sched.config.num_train_timesteps // sched.num_inference_steps
                a_prev = sched.alphas_cumprod[t_prev]
                a = sched.alphas_cumprod[int(t)]
                eps = (x - a.sqrt() * target) / (1 - a).sqrt()
                assert_close(result.prev_sample, a_prev.sqrt() * target + (1 - a_prev).sqrt() * eps)
                checked.append(point.index)

        return new_out, check

    run_schedule(scheduler, on_call)
    assert checked, "no call was checked"


@pytest.mark.parametrize(
    "name, ptype", [(n, "epsilon") for n in SCHEDULERS if n != "flow_euler"] + [("flow_euler", "flow")]
)
def test_step_numbering_and_progress(name, ptype):
    """Every scheduler maps its calls onto steps 0..N-1 (Heun/KDPM2: two calls per step, PNDM: one extra warm-up
    call), num_steps == N and progress runs 0 -> 1."""
    scheduler = build(name, ptype)
    adapter = adapter_for(scheduler)
    points = []

    def on_call(sched, t, x, out):
        points.append(adapter.locate(sched, t))
        return out, lambda result: None

    run_schedule(scheduler, on_call)
    assert [p.index for p in points] == list(range(len(points)))
    steps = [p.step for p in points]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == STEPS - 1
    assert set(steps) == set(range(STEPS))
    assert all(p.num_steps == STEPS for p in points)
    assert points[0].progress == 0.0 and points[-1].progress == 1.0 and points[-1].is_last
    for previous, point in zip(points, points[1:], strict=False):  # a second call completes its step
        assert point.step == (previous.step if point.phase == 1 else previous.step + 1)
    if name in ("heun", "kdpm2"):
        assert [p.phase for p in points] == [0] + [1, 0] * (STEPS - 1)
    if name == "pndm":
        assert steps[:3] == [0, 0, 1] and [p.phase for p in points][:3] == [0, 1, 0]
    sigmas = [p.sigma for p in points if p.phase == 0]
    assert all(a > b for a, b in zip(sigmas, sigmas[1:], strict=False)), "noise level must decrease"


def test_pndm_with_prk_warmup_numbering():
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(
        skip_prk_steps=False, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    adapter = adapter_for(scheduler)
    points = []

    def on_call(sched, t, x, out):
        points.append(adapter.locate(sched, t))
        return out, lambda result: None

    run_schedule(scheduler, on_call, steps=8)
    steps = [p.step for p in points]
    assert steps[:12] == [0] * 4 + [1] * 4 + [2] * 4 and steps[-1] == points[-1].num_steps - 1
    assert steps == sorted(steps)


# -- the coefficients against the forward processes ------------------------------------------------------------------


def _x0_eps(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64), torch.randn(
        3, 4, 5, 5, generator=gen, dtype=torch.float64
    )


@pytest.mark.parametrize("alpha_prod", [0.9991, 0.5, 0.0047])
def test_alpha_coefficients_invert_the_vp_forward_process(alpha_prod):
    x0, eps = _x0_eps()
    a, b = math.sqrt(alpha_prod), math.sqrt(1 - alpha_prod)
    x_t = a * x0 + b * eps
    outputs = {"epsilon": eps, "v_prediction": a * eps - b * x0, "sample": x0}
    for ptype, out in outputs.items():
        c_skip, c_out = alpha_coefficients(alpha_prod, ptype)
        torch.testing.assert_close(c_skip * x_t + c_out * out, x0)


@pytest.mark.parametrize("sigma", [14.6, 1.0, 0.03])
def test_karras_coefficients_invert_the_ve_forward_process(sigma):
    x0, eps = _x0_eps(1)
    x = x0 + sigma * eps  # the unscaled sample k-diffusion schedulers step on
    a, b = (
        1 / math.sqrt(1 + sigma**2),
        sigma / math.sqrt(1 + sigma**2),
    )  # the VP view of the scaled model input
    outputs = {"epsilon": eps, "v_prediction": a * eps - b * x0, "sample": x0, "original_sample": x0}
    for ptype, out in outputs.items():
        c_skip, c_out = karras_coefficients(sigma, ptype)
        torch.testing.assert_close(c_skip * x + c_out * out, x0)


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("sigma", [0.97, 0.4, 0.02])
def test_multistep_and_flow_coefficients(flow, sigma):
    x0, noise = _x0_eps(2)
    if flow:
        alpha_t, sigma_t = 1 - sigma, sigma
    else:
        alpha_t = 1 / math.sqrt(1 + sigma**2)
        sigma_t = sigma * alpha_t
    x = alpha_t * x0 + sigma_t * noise
    outputs = {"epsilon": noise, "sample": x0}
    if flow:  # (v_prediction on flow sigmas is not a consistent parameterisation: alpha^2 + sigma^2 != 1)
        outputs["flow_prediction"] = noise - x0
        c_skip, c_out = flow_coefficients(sigma)
        torch.testing.assert_close(c_skip * x + c_out * (noise - x0), x0)
    else:
        outputs["v_prediction"] = alpha_t * noise - sigma_t * x0
    for ptype, out in outputs.items():
        c_skip, c_out = alpha_sigma_coefficients(alpha_t, sigma_t, sigma, ptype)
        torch.testing.assert_close(c_skip * x + c_out * out, x0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_delta_keeps_dtype_and_untouched_bits(dtype):
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 6, 6, generator=gen).to(dtype)
    out = torch.randn(2, 4, 6, 6, generator=gen).to(dtype)
    c_skip, c_out = 1.0, -0.7
    x0 = output_to_x0(sample, out, c_skip, c_out)
    assert x0.dtype == torch.float32
    x0_new = x0.clone()
    x0_new[:, :, :2] = x0_new[:, :, :2].clamp(-0.1, 0.1)
    new = x0_delta_to_output(out, x0, x0_new, c_out)
    assert new.dtype == dtype and new.shape == out.shape
    changed = x0_new.ne(x0)
    assert torch.equal(new[~changed], out[~changed])
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(output_to_x0(sample, new, c_skip, c_out), x0_new, rtol=tol, atol=tol * 4)


def test_unchanged_x0_gives_the_same_output_bits():
    out = torch.randn(1, 4, 4, 4)
    x0 = torch.randn(1, 4, 4, 4)
    assert torch.equal(x0_delta_to_output(out, x0, x0.clone(), -0.3), out)


# -- the table ---------------------------------------------------------------------------------------------------------


def test_table_covers_the_required_schedulers():
    required = {
        "DDIMScheduler",
        "DDPMScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "HeunDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
        "FlowMatchEulerDiscreteScheduler",
    }
    assert required <= set(SUPPORTED_SCHEDULERS)


def test_unsupported_scheduler_is_named_with_the_supported_list():
    from diffusers import LCMScheduler

    with pytest.raises(UnsupportedSchedulerError, match="LCMScheduler") as info:
        adapter_for(LCMScheduler())
    assert "EulerDiscreteScheduler" in str(info.value) and "DDIMScheduler" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unsupported_prediction_type_is_named():
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler()
    scheduler.register_to_config(prediction_type="flow_prediction")
    with pytest.raises(UnsupportedSchedulerError, match="flow_prediction"):
        adapter_for(scheduler)


def test_subclass_of_a_supported_scheduler_is_accepted():
    from diffusers import EulerDiscreteScheduler

    class MyEuler(EulerDiscreteScheduler):
        pass

    assert adapter_for(MyEuler()).family == "karras"


# -- scheduler configuration variants (regression tests; issue 7, item 18) ------------------------------------------


def own_history_check(sched, name, result, x, point, target):
    """Compare the scheduler's own x0 (or the epsilon its history keeps) with the target; False if it has none."""
    if getattr(result, "pred_original_sample", None) is not None:
        assert_close(result.pred_original_sample, target)
        return True
    cfg = sched.config
    keeps_eps = (
        name == "deis"
        or (name in ("dpmpp", "dpmpp_single") and cfg.algorithm_type in ("dpmsolver", "sde-dpmsolver"))
        or (name == "unipc" and not cfg.predict_x0)
    )
    if keeps_eps:  # eps implied by the target x0 with the scheduler's own (alpha_t, sigma_t)
        alpha_t, sigma_t = sched._sigma_to_alpha_sigma_t(sched.sigmas[point.index])
        assert_close(sched.model_outputs[-1], (x - alpha_t * target) / sigma_t)
        return True
    if name in ("dpmpp", "dpmpp_single", "unipc"):
        assert_close(sched.model_outputs[-1], target)
        return True
    return False


def check_variant(scheduler, name, steps=STEPS, generator_seed=None):
    """Run a schedule editing x0 at every call; the scheduler must step on exactly the edited x0."""
    adapter = adapter_for(scheduler)
    checked = []

    def on_call(sched, t, x, out):
        point = adapter.locate(sched, t)
        x0 = output_to_x0(x, out, point.c_skip, point.c_out)
        mask = torch.rand(x0.shape, generator=torch.Generator().manual_seed(int(point.index))) < 0.3
        target = torch.where(mask, 0.5 * x0 + 0.25, x0)
        new_out = x0_delta_to_output(out, x0, target, point.c_out)

        def check(result):
            if own_history_check(sched, name, result, x, point, target):
                checked.append(point.index)

        return new_out, check

    run_schedule(scheduler, on_call, steps=steps)
    assert checked, "no call was checked"
    return checked


KARRAS_CAPABLE = ("euler", "heun", "lms", "kdpm2", "dpmpp", "dpmpp_single", "unipc", "deis")
VARIANTS = [(n, "karras", dict(use_karras_sigmas=True)) for n in KARRAS_CAPABLE]
VARIANTS += [
    (n, f"spacing-{s}", dict(timestep_spacing=s))
    for n in ("ddim", "euler", "dpmpp", "unipc")
    for s in ("leading", "linspace", "trailing")
]
VARIANTS += [
    (n, f"final-{f}", dict(final_sigmas_type=f)) for n in ("dpmpp", "unipc", "euler") for f in ("zero", "sigma_min")
]
# (the non-++ types need final_sigmas_type="sigma_min": diffusers refuses "zero" for them)
VARIANTS += [
    ("dpmpp", f"algo-{a}", dict(algorithm_type=a, final_sigmas_type="sigma_min"))
    for a in ("dpmsolver", "sde-dpmsolver", "sde-dpmsolver++")
]
VARIANTS += [("dpmpp_single", "algo-dpmsolver", dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"))]
VARIANTS += [("unipc", "predict_eps", dict(predict_x0=False)), ("unipc", "bh1", dict(solver_type="bh1"))]
VARIANTS += [("dpmpp", "order3", dict(solver_order=3)), ("euler", "exponential", dict(use_exponential_sigmas=True))]


@pytest.mark.parametrize("name, label, variant", VARIANTS, ids=[f"{n}-{lbl}" for n, lbl, _ in VARIANTS])
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_adapter_x0_on_scheduler_config_variants(name, label, variant, ptype):
    base = make_scheduler(name, ptype)
    scheduler = type(base).from_config(base.config, **variant)
    assert {k: scheduler.config.get(k) for k in variant} == variant  # from_config drops unknown keys silently
    torch.manual_seed(0)  # the SDE variants draw noise from the global generator
    check_variant(scheduler, name)


# -- zero terminal SNR (item 1) ---------------------------------------------------------------------------------------


def zero_snr(name, ptype):
    base = make_scheduler(name, ptype)
    scheduler = type(base).from_config(base.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    assert float(scheduler.alphas_cumprod[-1]) == 0.0
    return scheduler


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_zero_terminal_snr_v_prediction_has_finite_x0(name):
    scheduler = zero_snr(name, "v_prediction")
    point = adapter_for(scheduler).locate(scheduler, 999)
    assert (point.c_skip, point.c_out) == (0.0, -1.0) and point.sigma == math.inf  # x0 = -v at a = 0
    scheduler.set_timesteps(STEPS)
    assert int(scheduler.timesteps[0]) == 999
    torch.manual_seed(0)
    assert 0 in check_variant(scheduler, name)  # the a = 0 call is checked against the scheduler's own x0


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_zero_terminal_snr_epsilon_is_a_clear_error(name):
    scheduler = zero_snr(name, "epsilon")
    scheduler.set_timesteps(STEPS)
    with pytest.raises(UnsupportedSchedulerError, match="zero terminal SNR.*v_prediction"):
        adapter_for(scheduler).locate(scheduler, scheduler.timesteps[0])
    adapter_for(scheduler).locate(scheduler, scheduler.timesteps[1])  # a > 0: fine


@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp", "unipc"])
def test_zero_snr_on_sigma_schedulers(name):
    """These clamp alphas_cumprod[-1] to 2^-24 (sigma = 4096): the adapters must stay exact there."""
    base = make_scheduler(name, "v_prediction")
    scheduler = type(base).from_config(base.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    torch.manual_seed(0)
    if name == "euler_a":  # ancestral: checked through its pred_original_sample
        adapter = adapter_for(scheduler)

        def on_call(sched, t, x, out):
            point = adapter.locate(sched, t)
            x0 = output_to_x0(x, out, point.c_skip, point.c_out)
            return out, lambda result: assert_close(result.pred_original_sample, x0)

        run_schedule(scheduler, on_call)
    else:
        check_variant(scheduler, name)


# -- Euler with churn (item 4) ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("seeded", [True, False], ids=["generator", "global-rng"])
def test_euler_churn_x0_is_the_schedulers_own(ptype, seeded):
    """s_churn > 0: the step adds noise first and takes x0 from the churned sample at sigma_hat. The adapter draws
    the same noise (RNG restored), so an unedited run is bit-identical and an edited x0 is the one stepped on."""
    churn = dict(s_churn=2.0, s_noise=1.003)
    scheduler, plain = make_scheduler("euler", ptype), make_scheduler("euler", ptype)
    adapter = adapter_for(scheduler)
    gen, gen_plain = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for s in (scheduler, plain):
        s.set_timesteps(STEPS)
    x = x_plain = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    churned_calls = 0
    for i, t in enumerate(scheduler.timesteps):
        out = fake_model(scheduler.scale_model_input(x, t), t)
        point = adapter.locate(scheduler, t)
        torch.manual_seed(100 + i)
        args = dict(model_output=out, generator=gen if seeded else None, **churn)
        adjusted = adapter.adjust(scheduler, point, x, args)
        base, point = adjusted if adjusted is not None else (x, point)
        churned_calls += adjusted is not None
        x0 = output_to_x0(base, out, point.c_skip, point.c_out)
        # unedited: the adapter's x0 is the scheduler's own, and peeking the noise changed nothing
        plain.scale_model_input(x_plain, t)
        torch.manual_seed(100 + i)
        own = plain.step(out, t, x_plain, generator=gen_plain if seeded else None, **churn)
        assert_close(own.pred_original_sample, x0)
        # edited: the scheduler steps on exactly the edited x0
        target = x0.clamp(-0.5, 0.5)
        new_out = x0_delta_to_output(out, x0, target, point.c_out) if ptype != "sample" else target
        torch.manual_seed(100 + i)
        result = scheduler.step(new_out, t, x, generator=gen if seeded else None, **churn)
        assert_close(result.pred_original_sample, target)
        x, x_plain = own.prev_sample, own.prev_sample  # continue both from the same point
    assert churned_calls == STEPS
    # bit-identity of an unedited run is checked through the pipeline wrapper in test_integration.py


def test_euler_without_churn_is_not_adjusted():
    scheduler = make_scheduler("euler")
    scheduler.set_timesteps(STEPS)
    adapter = adapter_for(scheduler)
    point = adapter.locate(scheduler, scheduler.timesteps[0])
    x = torch.zeros(1, 4, 4, 4)
    assert adapter.adjust(scheduler, point, x, dict(model_output=x, s_churn=0.0)) is None
    assert adapter.adjust(scheduler, point, x, dict(model_output=x, s_churn=5.0, s_tmax=0.5)) is None  # outside
