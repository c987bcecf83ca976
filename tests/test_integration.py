"""qsilk.enable / qsilk.disable on tiny random-weight diffusers pipelines (SD 1.x eps/v, SDXL, SD3, Flux, DiT,
PixArt) across schedulers: no-op = bit-identical, defaults act, disable restores, and the x0 QSilk sees is the
scheduler's own x0 (before and after stabilisation)."""

import functools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")

sys.path.insert(0, str(Path(__file__).parent))
import qsilk  # noqa: E402
from qsilk import QSilk, QSilkConfig  # noqa: E402
from qsilk.integrations.diffusers import QSilkHandle, get_handle, grid_from_ids, pack_tokens, unpack_tokens  # noqa: E402
from qsilk.sampling import UnsupportedSchedulerError  # noqa: E402
from tiny_pipelines import PIPELINES, make_scheduler, run, tiny_sd_pipeline  # noqa: E402

torch.set_num_threads(1)

STEPS = 3

# (pipeline, prediction type, scheduler): every scheduler on SD 1.x (eps), the main ones with v-prediction, and
# each other family with its usual schedulers.
COMBOS = [("sd", "epsilon", s) for s in ("ddim", "ddpm", "pndm", "euler", "euler_a", "lms", "heun", "kdpm2")]
COMBOS += [("sd", "epsilon", s) for s in ("dpmpp", "dpmpp_single", "unipc", "deis")]
COMBOS += [("sd", "v_prediction", s) for s in ("ddim", "ddpm", "euler", "euler_a", "heun", "dpmpp", "unipc")]
COMBOS += [("sdxl", "epsilon", s) for s in ("euler", "euler_a", "dpmpp")]
COMBOS += [("sd3", "flow", s) for s in ("flow_euler", "dpmpp", "unipc")]
COMBOS += [("flux", "flow", "flow_euler")]
COMBOS += [("dit", "epsilon", s) for s in ("ddim", "ddpm", "euler", "heun", "dpmpp")]
COMBOS += [("pixart", "epsilon", s) for s in ("dpmpp", "ddim", "unipc", "euler")]


def build(family, ptype, scheduler):
    if family == "sd":
        return tiny_sd_pipeline(ptype, scheduler)
    if family in ("sdxl",):
        return PIPELINES[family](scheduler=scheduler, prediction_type=ptype)
    return PIPELINES[family](scheduler=scheduler)


class SpyQSilk(QSilk):
    """QSilk that keeps what it saw and what it returned."""

    def __init__(self, config):
        super().__init__(config)
        self.seen = []

    def __call__(self, x0, **kwargs):
        out = super().__call__(x0, **kwargs)
        self.seen.append((x0.detach().clone(), out.detach().clone()))
        return out


def install_recorder(scheduler):
    """An instance-level step wrapper (installed before qsilk) that records the scheduler's own x0 per call."""
    original = scheduler.step
    calls = []

    @functools.wraps(original)  # keeps the signature pipelines inspect (generator, eta)
    def step(*args, **kwargs):
        model_output, sample = args[0], args[2]
        result = original(*args, **kwargs)
        calls.append(own_x0(scheduler, result, model_output, sample))
        return result

    scheduler.step = step
    return calls


def own_x0(scheduler, result, model_output, sample):
    """The x0 the scheduler used in the step it just took (None where it keeps none we can read)."""
    if isinstance(result, tuple):
        if len(result) > 1 and isinstance(result[1], torch.Tensor):
            return result[1]
    elif getattr(result, "pred_original_sample", None) is not None:
        return result.pred_original_sample
    name = type(scheduler).__name__
    if name in ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler"):
        return scheduler.model_outputs[-1]
    if name == "FlowMatchEulerDiscreteScheduler":
        # Independent of the adapter's x0 = x - sigma v: read x0 off the step diffusers just took. Its Euler step
        # is x_next = x + (sigma_next - sigma) v, and the straight line through (sigma, x) and (sigma_next, x_next)
        # reaches sigma = 0 at x0 = x - sigma (x_next - x) / (sigma_next - sigma).
        prev = result[0] if isinstance(result, tuple) else result.prev_sample
        sigma, sigma_next = scheduler.sigmas[scheduler.step_index - 1], scheduler.sigmas[scheduler.step_index]
        return sample.double() - sigma.double() * (prev.double() - sample.double()) / (sigma_next - sigma).double()
    return None


def as_latent_layout(pipe, x0):
    """The spy sees (B, C, H, W); Flux's scheduler sees packed tokens: pack with diffusers' own function."""
    if type(pipe).__name__ == "FluxPipeline":
        b, c, h, w = x0.shape
        return type(pipe)._pack_latents(x0, b, c, h, w)
    return x0


def assert_close(actual, expected):
    scale = float(expected.abs().max()) + 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-5, atol=1e-5 * scale)


def check_parity(pipe, spy, calls, which):
    assert len(spy.seen) == len(calls)
    checked = 0
    for (x0_in, x0_out), own in zip(spy.seen, calls, strict=True):
        if own is None:
            continue
        seen = x0_in if which == "in" else x0_out
        assert_close(own, as_latent_layout(pipe, seen))
        checked += 1
    return checked


@pytest.mark.parametrize("family, ptype, scheduler", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_noop_identical_defaults_act_disable_restores_x0_parity(family, ptype, scheduler):
    pipe = build(family, ptype, scheduler)
    sched = pipe.scheduler
    plain = run(pipe, STEPS)
    calls = install_recorder(sched)
    recorder = sched.step
    num_calls = len(sched.timesteps)

    # 1. no-op config: bit-identical, and the x0 QSilk sees is the scheduler's own
    handle = qsilk.enable(pipe, QSilkConfig.noop())
    spy = handle.stab = SpyQSilk(handle.config)
    assert torch.equal(run(pipe, STEPS), plain)
    assert len(handle.stats) == num_calls and all(s["touched_fraction"] == 0 for s in handle.stats)
    checked = check_parity(pipe, spy, calls, "in")

    # 2. defaults (enabling again replaces the patch): the output changes, the stats show it, and the scheduler
    #    steps on exactly the stabilised x0
    calls.clear()
    handle2 = qsilk.enable(pipe)
    assert not handle.installed and handle2.installed
    spy = handle2.stab = SpyQSilk(handle2.config)
    acted = run(pipe, STEPS)
    assert acted.shape == plain.shape and not torch.equal(acted, plain)
    assert len(handle2.stats) == num_calls
    assert all(s["touched_fraction"] > 0 for s in handle2.stats), [
        s["touched_fraction"] for s in handle2.stats
    ]
    assert any(not torch.equal(a, b) for a, b in spy.seen)
    checked += check_parity(pipe, spy, calls, "out")
    if scheduler not in ("pndm", "deis"):  # these keep no x0 we can read (covered in test_sampling)
        assert checked == 2 * num_calls

    # 3. disable restores the step that was there (here: the recorder), and the pipeline is as never patched
    qsilk.disable(pipe)
    assert sched.step is recorder and get_handle(pipe) is None
    del sched.step
    assert "step" not in sched.__dict__
    assert torch.equal(run(pipe, STEPS), plain)


@pytest.mark.parametrize("family", ["sd", "flux", "dit"])
def test_decoded_images_noop_identical_and_defaults_differ(family):
    pipe = build(
        family, "flow" if family == "flux" else "epsilon", "flow_euler" if family == "flux" else "ddim"
    )
    plain = run(pipe, 2, output_type="np")
    with qsilk.enable(pipe, QSilkConfig.noop()):
        assert torch.equal(run(pipe, 2, output_type="np"), plain)
    with qsilk.enable(pipe):
        assert not torch.equal(run(pipe, 2, output_type="np"), plain)
    assert torch.equal(run(pipe, 2, output_type="np"), plain)


@pytest.mark.parametrize("scheduler", ["dpmpp", "euler"])
def test_bfloat16_pipeline(scheduler):
    """Reduced precision: dtype kept, no-op bit-identical, corrections survive the round trip through a bf16 model
    output. (Corrections below |c_out| * ulp(model output) at high noise round away, as the scheduler's own bf16
    x0 cannot hold them either; a larger clamp quantile makes them visible at this tiny size.)"""
    pipe = tiny_sd_pipeline(scheduler=scheduler).to(torch.bfloat16)
    plain = run(pipe, STEPS)
    with qsilk.enable(pipe, QSilkConfig.noop()):
        assert torch.equal(run(pipe, STEPS), plain)
    with qsilk.enable(pipe, clamp_quantile=0.02) as handle:
        acted = run(pipe, STEPS)
    assert acted.dtype == torch.bfloat16 and not torch.equal(acted, plain)
    assert all(s["touched_fraction"] > 0 for s in handle.stats)
    assert torch.equal(run(pipe, STEPS), plain)


# -- handle and lifecycle ---------------------------------------------------------------------------------------------


def test_context_manager_remove_is_idempotent_and_restores():
    pipe = tiny_sd_pipeline(scheduler="euler")
    plain = run(pipe, STEPS)
    with qsilk.enable(pipe) as handle:
        assert isinstance(handle, QSilkHandle) and get_handle(pipe) is handle
        assert "step" in pipe.scheduler.__dict__
        assert not torch.equal(run(pipe, STEPS), plain)
    assert "step" not in pipe.scheduler.__dict__ and get_handle(pipe) is None
    handle.remove()
    qsilk.disable(pipe)  # nothing enabled: a no-op
    assert torch.equal(run(pipe, STEPS), plain)


def test_wrapped_step_keeps_the_signature_pipelines_inspect():
    import inspect

    pipe = tiny_sd_pipeline(scheduler="euler_a")
    expected = inspect.signature(pipe.scheduler.step)
    with qsilk.enable(pipe):
        assert inspect.signature(pipe.scheduler.step) == expected
        assert "generator" in inspect.signature(pipe.scheduler.step).parameters


def test_pipelines_sharing_a_scheduler_get_one_qsilk():
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = tiny_sd_pipeline(scheduler="euler")
    plain = run(pipe, STEPS)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    assert img2img.scheduler is pipe.scheduler
    first = qsilk.enable(pipe)
    second = qsilk.enable(img2img, clamp_quantile=0.01)
    assert not first.installed and get_handle(pipe) is None and get_handle(img2img) is second
    acted = run(pipe, STEPS)
    assert not torch.equal(acted, plain) and len(second.stats) == STEPS and first.stats == []
    qsilk.disable(img2img)
    assert "step" not in pipe.scheduler.__dict__
    assert torch.equal(run(pipe, STEPS), plain)


def test_remove_under_a_later_wrapper_passes_through():
    pipe = tiny_sd_pipeline(scheduler="euler")
    plain = run(pipe, STEPS)
    handle = qsilk.enable(pipe)
    inner = pipe.scheduler.step

    @functools.wraps(inner)
    def outer(*args, **kwargs):
        return inner(*args, **kwargs)

    pipe.scheduler.step = outer
    with pytest.warns(RuntimeWarning, match="wrapped again"):
        handle.remove()
    assert pipe.scheduler.step is outer  # the later wrapper is kept
    assert torch.equal(run(pipe, STEPS), plain) and handle.stats == []


def test_flux_hooks_are_removed():
    pipe = PIPELINES["flux"]()
    before = dict(pipe.transformer._forward_pre_hooks)
    handle = qsilk.enable(pipe)
    assert len(pipe.transformer._forward_pre_hooks) == len(before) + 1
    handle.remove()
    assert dict(pipe.transformer._forward_pre_hooks) == before


def test_unsupported_scheduler_raises_at_enable_and_touches_nothing():
    from diffusers import LCMScheduler

    pipe = tiny_sd_pipeline()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(UnsupportedSchedulerError, match="LCMScheduler") as info:
        qsilk.enable(pipe)
    assert "DDIMScheduler" in str(info.value)
    assert "step" not in pipe.scheduler.__dict__ and get_handle(pipe) is None


def test_bad_config_and_overrides_are_named():
    pipe = tiny_sd_pipeline()
    with pytest.raises(ValueError, match="clamp_quantile"):
        qsilk.enable(pipe, clamp_quantile=0.7)
    with pytest.raises(ValueError, match="nonsense"):
        qsilk.enable(pipe, nonsense=1)
    with pytest.raises(TypeError, match="config"):
        qsilk.enable(pipe, 42)
    with pytest.raises(TypeError, match="scheduler"):
        qsilk.enable(object())
    assert get_handle(pipe) is None
    handle = qsilk.enable(pipe, {"clamp_quantile": 0.01}, aqclip=False)
    assert handle.config.clamp_quantile == 0.01 and handle.config.aqclip is False
    handle.remove()


def test_stats_fields_are_json_serialisable():
    pipe = tiny_sd_pipeline(scheduler="heun")
    with qsilk.enable(pipe) as handle:
        run(pipe, STEPS)
    stats = json.loads(json.dumps(handle.stats))
    assert len(stats) == 2 * STEPS - 1  # Heun: two calls per step but the last
    assert [s["step"] for s in stats] == [0, 0, 1, 1, 2] and [s["phase"] for s in stats] == [0, 1, 0, 1, 0]
    assert stats[0]["progress"] == 0.0 and stats[-1]["progress"] == 1.0
    for s in stats:
        assert isinstance(s["timestep"], float) and isinstance(s["sigma"], float) and s["sigma"] > 0
        for key in (
            "clamp_fraction",
            "aqclip_fraction",
            "touched_fraction",
            "max_abs_before",
            "max_abs_after",
        ):
            assert isinstance(s[key], float)
        assert s["max_abs_after"] <= s["max_abs_before"]
    handle.clear_stats()
    assert handle.stats == [] and handle.maps == []


def test_new_run_resets_state_so_runs_repeat():
    """With a corridor EMA, state carried over between runs would change the second run; it must not."""
    pipe = tiny_sd_pipeline(scheduler="dpmpp")
    with qsilk.enable(pipe, ema=0.7, aqclip_k_min=0.5, aqclip_k_max=1.0) as handle:
        first = run(pipe, STEPS)
        second = run(pipe, STEPS)
    assert torch.equal(first, second)
    assert [s["run"] for s in handle.stats] == [0] * STEPS + [1] * STEPS


def test_works_at_cfg_1():
    pipe = tiny_sd_pipeline(scheduler="euler")
    plain = run(pipe, STEPS, guidance_scale=1.0)
    with qsilk.enable(pipe, QSilkConfig.noop()):
        assert torch.equal(run(pipe, STEPS, guidance_scale=1.0), plain)
    with qsilk.enable(pipe) as handle:
        assert not torch.equal(run(pipe, STEPS, guidance_scale=1.0), plain)
    assert all(s["touched_fraction"] > 0 for s in handle.stats)


def test_img2img_progress_starts_mid_schedule():
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**tiny_sd_pipeline(scheduler="euler").components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32)
    plain = run(pipe, 4, image=image, strength=0.5, height=None, width=None)
    with qsilk.enable(pipe, QSilkConfig.noop()):
        assert torch.equal(run(pipe, 4, image=image, strength=0.5, height=None, width=None), plain)
    with qsilk.enable(pipe) as handle:
        assert not torch.equal(run(pipe, 4, image=image, strength=0.5, height=None, width=None), plain)
    assert [s["step"] for s in handle.stats] == [2, 3] and handle.stats[-1]["progress"] == 1.0


def test_windows_gate_the_steps():
    pipe = tiny_sd_pipeline(scheduler="ddim")
    plain = run(pipe, 4)
    with qsilk.enable(pipe, clamp_window=(0.5, 1.0), aqclip_window=(0.5, 1.0)) as handle:
        out = run(pipe, 4)
    assert not torch.equal(out, plain)
    assert [s["clamp_active"] for s in handle.stats] == [False, False, True, True]
    assert [s["touched_fraction"] > 0 for s in handle.stats] == [False, False, True, True]


def test_placement_final_is_qsilk_on_the_last_latent():
    pipe = tiny_sd_pipeline(scheduler="euler")
    plain = run(pipe, STEPS)
    config = QSilkConfig(placement="final")
    with qsilk.enable(pipe, config) as handle:
        out = run(pipe, STEPS)
    expected = QSilk(config)(plain)  # every operator, structure confidence, once
    assert torch.equal(out, expected) and not torch.equal(out, plain)
    assert len(handle.stats) == 1 and handle.stats[0]["progress"] == 1.0


def test_placement_final_on_packed_flux_latents():
    pipe = PIPELINES["flux"]()
    plain = run(pipe, STEPS)
    config = QSilkConfig(placement="final")
    with qsilk.enable(pipe, config):
        out = run(pipe, STEPS)
    b, n, d = plain.shape
    side = int(n**0.5)
    unpacked = type(pipe)._unpack_latents(
        plain, 2 * side * pipe.vae_scale_factor, 2 * side * pipe.vae_scale_factor, pipe.vae_scale_factor
    )
    assert torch.equal(out, pack_tokens(QSilk(config)(unpacked)))


def test_record_maps():
    pipe = tiny_sd_pipeline(scheduler="unipc")
    with qsilk.enable(pipe, record_maps=True) as handle:
        run(pipe, STEPS)
    assert [m["step"] for m in handle.maps] == list(range(STEPS))
    for entry, stats in zip(handle.maps, handle.stats, strict=True):
        assert entry["delta"].shape == (1, 1, 16, 16) and entry["delta"].device.type == "cpu"
        assert entry["delta"].dtype == torch.float32
        assert (entry["delta"].max() > 0) == (stats["touched_fraction"] > 0)
        conf = entry["confidence"]
        assert conf.shape == (1, 1, 16, 16) and float(conf.min()) >= 0 and float(conf.max()) <= 1
    json.dumps(handle.stats)
    with qsilk.enable(pipe, record_maps=True, confidence=None) as handle:
        run(pipe, STEPS)
    assert all(m["confidence"] is None for m in handle.maps)


def test_confidence_provider_is_called_every_step_and_used():
    pipe = tiny_sd_pipeline(scheduler="heun")
    config = QSilkConfig(clamp=False, aqclip_k_min=0.5, aqclip_k_max=3.0)
    outputs = {}
    for value in (0.0, 1.0):
        with qsilk.enable(pipe, config) as handle:
            seen = []

            def provider(x0, step, value=value, seen=seen):
                seen.append((tuple(x0.shape), step))
                return torch.full((x0.shape[0], 1, 4, 4), value)

            handle.confidence_provider = provider
            outputs[value] = run(pipe, STEPS)
        assert seen == [((1, 4, 16, 16), s) for s in (0, 0, 1, 1, 2)]
        assert all(s["confidence_mean"] == value for s in handle.stats)
    assert not torch.equal(outputs[0.0], outputs[1.0])


def test_top_level_enable_passes_record_maps():
    pipe = tiny_sd_pipeline()
    handle = qsilk.enable(pipe, None, record_maps=True)
    run(pipe, 2)
    assert len(handle.maps) == 2
    qsilk.disable(pipe)
    assert get_handle(pipe) is None


# -- DDPM learned variance, called through the wrapper directly ------------------------------------------------------------


def test_ddpm_learned_variance_channels_pass_through():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(variance_type="learned_range", clip_sample=False)
    scheduler.set_timesteps(4)
    pipe = SimpleNamespace(scheduler=scheduler)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    output = torch.randn(2, 8, 8, 8, generator=gen) * 3
    t = scheduler.timesteps[1]
    seen = []
    original = scheduler.step

    def recorder(model_output, timestep, sample, **kwargs):
        seen.append(model_output)
        return original(model_output, timestep, sample, **kwargs)

    scheduler.step = recorder
    with qsilk.enable(pipe) as handle:
        spy = handle.stab = SpyQSilk(handle.config)
        result = scheduler.step(output, t, sample, generator=torch.Generator().manual_seed(1))
    passed = seen[0]
    assert passed.shape == output.shape
    assert torch.equal(passed[:, 4:], output[:, 4:])  # the variance channels are never touched
    assert not torch.equal(passed[:, :4], output[:, :4])
    assert_close(result.pred_original_sample, spy.seen[0][1])
    assert scheduler.step is recorder


# -- Flux packing against diffusers' own functions ------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(8, 8), (6, 10)])
def test_flux_pack_unpack_match_diffusers(hw):
    from diffusers import FluxPipeline

    h, w = hw
    latent = torch.randn(2, 4, 2 * h, 2 * w)
    packed = FluxPipeline._pack_latents(latent, 2, 4, 2 * h, 2 * w)
    assert torch.equal(pack_tokens(latent), packed)
    assert torch.equal(unpack_tokens(packed, (h, w)), latent)
    ids = FluxPipeline._prepare_latent_image_ids(2, h, w, "cpu", torch.float32)
    assert grid_from_ids(ids, h * w) == (h, w)
    assert grid_from_ids(ids.flip(0), h * w) is None  # not row-major: refuse rather than scramble


def test_packed_latents_without_ids_warn_and_run_untouched():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(3)
    pipe = SimpleNamespace(scheduler=scheduler)
    sample = torch.randn(1, 16, 16)
    output = torch.randn(1, 16, 16)
    reference = FlowMatchEulerDiscreteScheduler()
    reference.set_timesteps(3)
    expected = reference.step(output, reference.timesteps[0], sample).prev_sample
    with qsilk.enable(pipe), pytest.warns(RuntimeWarning, match="latent grid"):
        got = scheduler.step(output, scheduler.timesteps[0], sample).prev_sample
    assert torch.equal(got, expected)


def test_scheduler_table_entry_is_used_for_flow_configs():
    pipe = tiny_sd_pipeline()
    pipe.scheduler = make_scheduler("unipc", flow=True)
    with qsilk.enable(pipe) as handle:
        assert handle.adapter.family == "multistep"


# -- issue 7: zero-SNR schedules, a replaced scheduler, Euler churn -----------------------------------------------------


def zero_snr_pipeline(prediction_type):
    from diffusers import DDIMScheduler

    pipe = tiny_sd_pipeline(prediction_type, "ddim")
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing"
    )
    return pipe


def test_zero_terminal_snr_v_prediction_runs_with_qsilk():
    pipe = zero_snr_pipeline("v_prediction")
    plain = run(pipe, STEPS)
    calls = install_recorder(pipe.scheduler)
    with qsilk.enable(pipe, QSilkConfig.noop()):
        assert torch.equal(run(pipe, STEPS), plain)
    calls.clear()
    with qsilk.enable(pipe) as handle:
        spy = handle.stab = SpyQSilk(handle.config)
        acted = run(pipe, STEPS)
    assert bool(torch.isfinite(acted).all()) and not torch.equal(acted, plain)
    assert check_parity(pipe, spy, calls, "out") == STEPS  # including the a = 0 step
    stats = json.loads(json.dumps(handle.stats, allow_nan=False))  # standard JSON: sigma = inf is recorded as null
    assert stats[0]["timestep"] == 999.0 and stats[0]["sigma"] is None and stats[1]["sigma"] > 0


def test_zero_terminal_snr_epsilon_is_a_clear_error_at_the_first_step():
    from qsilk.sampling import ZeroTerminalSNRError

    pipe = zero_snr_pipeline("epsilon")
    with qsilk.enable(pipe), pytest.raises(ZeroTerminalSNRError, match="timestep 999.*zero terminal SNR"):
        run(pipe, STEPS)


def test_replacing_pipe_scheduler_after_enable_moves_the_patch():
    from diffusers import EulerDiscreteScheduler

    pipe = tiny_sd_pipeline(scheduler="ddim")
    old = pipe.scheduler
    reference = tiny_sd_pipeline(scheduler="ddim")
    reference.scheduler = EulerDiscreteScheduler.from_config(old.config)
    euler_plain = run(reference, STEPS)
    with qsilk.enable(reference):
        euler_qsilk = run(reference, STEPS)

    handle = qsilk.enable(pipe)
    pipe.scheduler = EulerDiscreteScheduler.from_config(old.config)
    out = run(pipe, STEPS)
    assert torch.equal(out, euler_qsilk) and not torch.equal(out, euler_plain)
    assert handle.installed and handle.scheduler is pipe.scheduler and len(handle.stats) == STEPS
    assert "step" not in old.__dict__  # the old scheduler is restored exactly
    qsilk.disable(pipe)
    assert "step" not in pipe.scheduler.__dict__
    assert torch.equal(run(pipe, STEPS), euler_plain)


def test_replacing_pipe_scheduler_with_an_unsupported_one_raises_at_run_time():
    from diffusers import LCMScheduler

    pipe = tiny_sd_pipeline(scheduler="ddim")
    handle = qsilk.enable(pipe)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(UnsupportedSchedulerError, match="replaced by LCMScheduler after qsilk.enable"):
        run(pipe, STEPS)
    handle.remove()
    run(pipe, STEPS)  # without QSilk the pipeline runs


def test_euler_churn_through_the_wrapper():
    """A custom loop calling step(s_churn=...): QSilk sees the scheduler's own (churned) x0, a no-op config keeps
    the run bit-identical (the noise is peeked with the RNG state restored), and the step uses QSilk's x0."""
    pipe = tiny_sd_pipeline(scheduler="euler")
    sched = pipe.scheduler

    def loop(seed=0):
        sched.set_timesteps(STEPS)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 4, 16, 16, generator=gen) * sched.init_noise_sigma
        x[0, 1, 3, 3] = 40.0
        for t in sched.timesteps:
            out = 0.9 * torch.tanh(sched.scale_model_input(x, t))
            x = sched.step(out, t, x, s_churn=2.0, generator=gen).prev_sample
        return x

    plain = loop()
    calls = install_recorder(sched)
    with qsilk.enable(pipe, QSilkConfig.noop()) as handle:
        spy = handle.stab = SpyQSilk(handle.config)
        assert torch.equal(loop(), plain)
    assert check_parity(pipe, spy, calls, "in") == STEPS
    calls.clear()
    with qsilk.enable(pipe) as handle:
        spy = handle.stab = SpyQSilk(handle.config)
        acted = loop()
    assert not torch.equal(acted, plain) and check_parity(pipe, spy, calls, "out") == STEPS


def test_handle_stats_stay_on_the_device_until_read():
    from qsilk.stabilizer import StepStats

    pipe = tiny_sd_pipeline(scheduler="euler")
    with qsilk.enable(pipe) as handle:
        run(pipe, STEPS)
    pending = [s for s, _ in handle._stats]
    assert len(pending) == STEPS and all(isinstance(s, StepStats) and s._dict is None for s in pending)
    stats = handle.stats  # one transfer for all steps
    assert [s["step"] for s in stats] == list(range(STEPS)) and all(s["touched_fraction"] > 0 for s in stats)
    assert handle.stats == stats and json.loads(json.dumps(stats, allow_nan=False)) == stats
