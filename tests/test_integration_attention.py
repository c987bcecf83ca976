"""qsilk.enable(confidence="attention"): the attention-entropy probe wired into the diffusers integration."""

import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

sys.path.insert(0, str(Path(__file__).parent))
import qsilk  # noqa: E402
from qsilk import QSilkConfig  # noqa: E402
from tiny_pipelines import run, tiny_dit_pipeline, tiny_flux_pipeline, tiny_sd_pipeline  # noqa: E402

torch.set_num_threads(1)

STEPS = 3
# AQClip only, with a corridor tight enough that the confidence map decides what moves
TIGHT = dict(clamp=False, aqclip_k_min=0.5, aqclip_k_max=2.0)


def hook_state(model):
    return {
        name: (dict(m._forward_pre_hooks), dict(m._forward_hooks), getattr(m, "processor", None))
        for name, m in model.named_modules()
    }


def record_provider(handle):
    """Wrap the handle's provider to keep what the probe returned each step."""
    maps = []
    provider = handle.confidence_provider

    def recorded(x0, step):
        conf = provider(x0, step)
        maps.append(conf)
        return conf

    handle.confidence_provider = recorded
    return maps


def test_probe_installed_with_operators_off_is_bit_identical_and_removed_on_disable():
    pipe = tiny_sd_pipeline(scheduler="dpmpp")
    plain = run(pipe, STEPS)
    before = hook_state(pipe.unet)
    processors = dict(pipe.unet.attn_processors)
    # AQClip "on" with a corridor no value can leave: the probe runs every step but nothing may change
    config = QSilkConfig(confidence="attention", clamp=False, aqclip_k_min=1e4, aqclip_k_max=1e4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the probe must capture every step, silently
        handle = qsilk.enable(pipe, config)
        assert handle.probe is not None and handle.probe.installed
        assert hook_state(pipe.unet) != before
        maps = record_provider(handle)
        assert torch.equal(run(pipe, STEPS), plain)
    assert len(maps) == STEPS and all(m is not None and m.shape == (1, 1, 16, 16) for m in maps)
    assert all(s["confidence_mean"] is not None and s["touched_fraction"] == 0 for s in handle.stats)
    qsilk.disable(pipe)
    assert not handle.probe.installed
    assert hook_state(pipe.unet) == before
    assert all(pipe.unet.attn_processors[k] is v for k, v in processors.items())
    assert torch.equal(run(pipe, STEPS), plain)


def test_attention_mode_changes_images_differently_from_structure():
    pipe = tiny_sd_pipeline(scheduler="euler")
    plain = run(pipe, STEPS)
    with qsilk.enable(pipe, confidence="structure", **TIGHT):
        structure = run(pipe, STEPS)
    with qsilk.enable(pipe, confidence="attention", record_maps=True, **TIGHT) as handle:
        maps = record_provider(handle)
        attention = run(pipe, STEPS)
    assert not torch.equal(attention, plain) and not torch.equal(attention, structure)
    assert all(m is not None for m in maps)
    # the recorded confidence is the probe's map (resized to the latent grid), not the structure proxy
    for recorded, probe_map in zip(handle.maps, maps, strict=True):
        torch.testing.assert_close(recorded["confidence"], probe_map.float().cpu())
    assert torch.equal(run(pipe, STEPS), plain)


def test_probe_resets_with_each_new_run():
    pipe = tiny_sd_pipeline(scheduler="ddim")
    with qsilk.enable(pipe, confidence="attention", attention_ema=0.8, ema=0.5, **TIGHT):
        first = run(pipe, STEPS)
        second = run(pipe, STEPS)
    assert torch.equal(first, second)


def test_probe_failure_falls_back_to_structure():
    """A processor that bypasses SDPA: the probe warns (once) and QSilk uses the structure proxy instead."""
    from diffusers.models.attention_processor import AttnProcessor

    pipe = tiny_sd_pipeline(scheduler="euler")
    pipe.unet.set_attn_processor(AttnProcessor())
    with qsilk.enable(pipe, confidence="structure", **TIGHT):
        structure = run(pipe, STEPS)
    with (
        pytest.warns(RuntimeWarning, match="recorded nothing"),
        qsilk.enable(pipe, confidence="attention", **TIGHT) as handle,
    ):
        maps = record_provider(handle)
        fallback = run(pipe, STEPS)
    assert all(m is None for m in maps)
    assert torch.equal(fallback, structure)


def test_noop_config_installs_no_probe():
    pipe = tiny_sd_pipeline()
    before = hook_state(pipe.unet)
    with qsilk.enable(pipe, QSilkConfig.noop().replace(confidence="attention")) as handle:
        assert handle.probe is None and handle.confidence_provider is None
        assert hook_state(pipe.unet) == before


def test_dit_reads_the_conditional_half_first():
    pipe = tiny_dit_pipeline(scheduler="ddim")
    plain = run(pipe, STEPS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with qsilk.enable(pipe, confidence="attention", **TIGHT) as handle:
            assert handle.probe.cfg_order == "cond_uncond"
            maps = record_provider(handle)
            out = run(pipe, STEPS)
    assert not torch.equal(out, plain)
    # DiTPipeline steps on the doubled (cond, dup) latent batch: one map per row, all from the probe
    assert all(m is not None and m.shape == (4, 1, 16, 16) for m in maps)


def test_flux_attention_maps_on_the_unpacked_grid():
    pipe = tiny_flux_pipeline()
    plain = run(pipe, STEPS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with qsilk.enable(pipe, confidence="attention", **TIGHT) as handle:
            maps = record_provider(handle)
            out = run(pipe, STEPS)
    assert not torch.equal(out, plain)
    assert all(m is not None and m.shape == (1, 1, 16, 16) for m in maps)
    assert torch.equal(run(pipe, STEPS), plain)


def test_demo_pipeline_is_cond_first_and_works_in_attention_mode():
    from diffusers import DDIMScheduler

    from qsilk.integrations.diffusers import cfg_order_of
    from qsilk.models.demo import QSilkDemoPipeline
    from qsilk.models.demo.autoencoder import build_autoencoder
    from qsilk.models.demo.dit import SCHEDULE_CONFIG, build_dit

    torch.manual_seed(0)
    transformer, vae = build_dit(preset="tiny"), build_autoencoder("tiny")
    with torch.no_grad():  # adaLN-Zero starts as a zero predictor: perturb it so attention has structure
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pipe = QSilkDemoPipeline(transformer, vae, DDIMScheduler(**SCHEDULE_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    assert cfg_order_of(pipe) == "cond_uncond"

    def sample():
        return pipe(class_labels=[1, 2], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                    output_type="np").images  # fmt: skip

    plain = sample()
    with qsilk.enable(pipe, QSilkConfig.noop()):
        assert (sample() == plain).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with qsilk.enable(pipe, confidence="attention", **TIGHT) as handle:
            assert handle.probe.cfg_order == "cond_uncond"
            maps = record_provider(handle)
            acted = sample()
    assert not (acted == plain).all()
    assert all(m is not None and m.shape[0] == 2 for m in maps)
    assert (sample() == plain).all()
