"""qsilk.enable(confidence="attention"): the attention-entropy probe wired into the diffusers integration."""

import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

sys.path.insert(0, str(Path(__file__).parent))
import qsilk  # noqa: E402
from qsilk import QSilkConfig  # noqa: E402
from qsilk.integrations.diffusers import CFG_ORDER, QSilkHandle, cfg_order_of  # noqa: E402
from test_attention_probe import SHARPEN, in_region, region_stats  # noqa: E402
from tiny_pipelines import run, tiny_demo_pipeline, tiny_dit_pipeline, tiny_flux_pipeline, tiny_sd_pipeline  # noqa: E402

torch.set_num_threads(1)

STEPS = 3
# AQClip only, with a corridor tight enough that the confidence map decides what moves
TIGHT = dict(clamp=False, aqclip_k_min=0.5, aqclip_k_max=2.0)


def hook_state(model):
    """Hooks and processors of every module, except the handle's own denoiser hook (it follows pipe.scheduler and
    is there in every mode): what the attention probe adds shows up here."""

    def foreign(hooks):
        return {k: h for k, h in hooks.items() if not isinstance(getattr(h, "__self__", None), QSilkHandle)}

    return {
        name: (foreign(m._forward_pre_hooks), foreign(m._forward_hooks), getattr(m, "processor", None))
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


# -- the conditional half of a CFG batch, for both orders ----------------------------------------------------------

COND_SIDE, UNCOND_SIDE = (
    (0.0, 1.0, 0.0, 0.5),
    (0.0, 1.0, 0.5, 1.0),
)  # (top, bottom, left, right): left / right half


def mark_cfg_branches(denoiser, layers, latent_hw, is_uncond):
    """Hooks giving the conditional rows sharp attention on the left half of the image and the unconditional rows
    on the right half (uniform attention elsewhere). Which rows are unconditional is read from the denoiser's own
    inputs by ``is_uncond(kwargs) -> (B,) bool``, independently of any cfg order."""
    state = {}

    def read_rows(module, args, kwargs):
        state["uncond"] = is_uncond(kwargs)

    def sharpen(module, args, output):
        tokens = output.shape[1]
        f = next(f for f in (1, 2, 4, 8) if (latent_hw[0] // f) * (latent_hw[1] // f) == tokens)
        h, w = latent_hw[0] // f, latent_hw[1] // f
        left, right = (in_region(h, w, side).flatten().float() for side in (COND_SIDE, UNCOND_SIDE))
        gain = torch.where(state["uncond"][:, None], right, left) * SHARPEN
        return output * gain[..., None]

    handles = [denoiser.register_forward_pre_hook(read_rows, with_kwargs=True)]
    handles += [layer.module.to_q.register_forward_hook(sharpen) for layer in layers]
    return handles


def assert_side(confidence, side):
    low_inside, high_outside, _ = region_stats(confidence, side)
    assert low_inside > 0.8 and high_outside < 0.2, (float(low_inside), float(high_outside))


def branch_maps(pipe, denoiser, is_uncond, **call):
    """Per-step confidence maps of attention mode with the CFG branches marked."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with qsilk.enable(pipe, confidence="attention", **TIGHT) as handle:
            handles = mark_cfg_branches(denoiser, handle.probe.layers, (16, 16), is_uncond)
            try:
                maps = record_provider(handle)
                run(pipe, STEPS, **call)
            finally:
                for h in handles:
                    h.remove()
    assert len(maps) == STEPS and all(m is not None for m in maps)
    return maps


def sd_is_uncond(kwargs):
    return kwargs["encoder_hidden_states"].flatten(1).abs().amax(dim=1) == 0  # the all-zero negative embeds


SD_EMBEDS = dict(
    prompt=None,
    prompt_embeds=torch.ones(1, 16, 32),
    negative_prompt_embeds=torch.zeros(1, 16, 32),
)


@pytest.mark.parametrize("order", ["table", "swapped"])
def test_sd_reads_the_conditional_half_uncond_first(order):
    """StableDiffusionPipeline batches [uncond, cond]: every step's map is the conditional branch's attention. With
    the order declared wrongly the map follows the unconditional branch, so this test can tell them apart."""
    pipe = tiny_sd_pipeline(scheduler="ddim")
    assert cfg_order_of(pipe) == "uncond_cond"
    if order == "swapped":
        pipe.cfg_order = "cond_uncond"
    maps = branch_maps(pipe, pipe.unet, sd_is_uncond, **SD_EMBEDS)
    for m in maps:
        assert m.shape == (1, 1, 16, 16)
        assert_side(m, COND_SIDE if order == "table" else UNCOND_SIDE)


def test_dit_reads_the_conditional_half_cond_first():
    """DiTPipeline batches [cond, uncond] (null class 1000). It steps on the doubled latent batch, so the probe (auto
    mode: denoiser batch == latent batch) maps each row from its own forward row: rows [0, 2) are the conditional
    samples the pipeline keeps, rows [2, 4) the duplicates it discards."""
    pipe = tiny_dit_pipeline(scheduler="ddim")
    assert cfg_order_of(pipe) == "cond_uncond"
    maps = branch_maps(pipe, pipe.transformer, lambda kwargs: kwargs["class_labels"] == 1000)
    for m in maps:
        assert m.shape == (4, 1, 16, 16)
        assert_side(m[:2], COND_SIDE)
        assert_side(m[2:], UNCOND_SIDE)


def test_cond_first_batch_reads_the_first_half():
    """A pipeline whose denoiser sees [cond, uncond] and that steps on the half batch (like Lumina or the demo
    pipeline) and says so with its own cfg_order: the map is the first half's."""
    pipe = tiny_sd_pipeline(scheduler="ddim")

    def cond_first(module, args, kwargs):  # the unet sees [cond, uncond] ...
        if args[0].shape[0] != 2:
            return None
        kwargs = dict(kwargs, encoder_hidden_states=kwargs["encoder_hidden_states"].flip(0))
        return (args[0].flip(0), *args[1:]), kwargs

    def back_to_pipeline_order(module, args, kwargs, output):  # ... and the pipeline gets [uncond, cond] back
        if args[0].shape[0] != 2:
            return None
        return (output[0].flip(0), *output[1:])

    hooks = [
        pipe.unet.register_forward_pre_hook(cond_first, with_kwargs=True, prepend=True),
        pipe.unet.register_forward_hook(back_to_pipeline_order, with_kwargs=True),
    ]
    pipe.cfg_order = (
        "cond_uncond"  # the pipeline's own declaration wins over the table's StableDiffusionPipeline
    )
    assert cfg_order_of(pipe) == "cond_uncond"
    try:
        for m in branch_maps(pipe, pipe.unet, sd_is_uncond, **SD_EMBEDS):
            assert_side(m, COND_SIDE)
    finally:
        for hook in hooks:
            hook.remove()


# -- where the CFG order comes from ------------------------------------------------------------------------------------


def named(name, **attrs):
    return type(name, (), attrs)()


def test_cfg_order_table_and_precedence():
    assert cfg_order_of(named("StableDiffusionXLPipeline")) == "uncond_cond"
    assert cfg_order_of(named("LuminaPipeline")) == "cond_uncond"
    assert cfg_order_of(named("DiTPipeline")) == "cond_uncond"
    assert cfg_order_of(named("FluxPipeline")) == "cond_uncond"  # separate calls, conditional first
    # a subclass inherits its base's entry; the pipeline's own attribute comes first
    base = type("PixArtSigmaPipeline", (), {})
    assert cfg_order_of(type("MyPixArt", (base,), {})()) == "uncond_cond"
    assert cfg_order_of(type("MyPixArt", (base,), {"cfg_order": "cond_uncond"})()) == "cond_uncond"
    with pytest.raises(ValueError, match="cfg_order must be one of"):
        cfg_order_of(named("DiTPipeline", cfg_order="cond-first"))


def test_unknown_pipeline_warns_and_assumes_uncond_first():
    with pytest.warns(RuntimeWarning, match="CFG batch order of MysteryPipeline is unknown.*pipe.cfg_order"):
        assert cfg_order_of(named("MysteryPipeline")) == "uncond_cond"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg_order_of(named("MysteryPipeline", cfg_order="cond_uncond"))  # declared: nothing to warn about


def _pipeline_sources() -> dict[str, str]:
    import diffusers

    root = Path(diffusers.__file__).parent / "pipelines"
    sources = {}
    for path in root.rglob("pipeline_*.py"):
        if "deprecated" in path.parts:
            continue
        text = path.read_text(encoding="utf-8")
        for name in re.findall(r"^class (\w+)\(", text, re.M):
            sources.setdefault(name, text)
    return sources


def test_cfg_order_table_matches_the_installed_diffusers_sources():
    """Each table entry against the pipeline's source: how it batches prompts and splits the prediction, or which
    of its separate denoiser calls comes first."""
    sources = _pipeline_sources()
    batched_uncond_first = re.compile(r"\w*uncond\w*, \w*(?:text|cond)\w* = noise_pred\.chunk\(2\)")
    batched_cond_first = re.compile(r"\w*cond\w*, \w*uncond\w* = torch\.split\(")
    calls = re.compile(r"^\s*(\w+) = self\.(?:transformer|unet)\(", re.M)
    for name, order in CFG_ORDER.items():
        assert name in sources, f"{name} is not a pipeline class of the installed diffusers"
        text = sources[name]
        if order == "uncond_cond":
            assert batched_uncond_first.search(text), name
            assert "torch.cat([negative_prompt_embeds, prompt_embeds]" in text, name
            assert not batched_cond_first.search(text), name
        else:
            targets = calls.findall(text)
            separate = (
                len(targets) >= 2
                and not re.search("uncond|neg", targets[0])
                and re.search("uncond|neg", targets[1])
            )
            assert batched_cond_first.search(text) or separate, (name, targets)
            assert not batched_uncond_first.search(text), name


# -- confidence_source in the per-step stats ----------------------------------------------------------------------------


def test_confidence_source_is_recorded_per_step():
    import json

    from diffusers.models.attention_processor import AttnProcessor

    pipe = tiny_sd_pipeline(scheduler="euler")
    with qsilk.enable(pipe, confidence="attention", **TIGHT) as handle:
        run(pipe, STEPS)
    assert [s["confidence_source"] for s in handle.stats] == ["attention"] * STEPS
    with qsilk.enable(pipe, confidence="structure", **TIGHT) as handle:
        run(pipe, STEPS)
    assert [s["confidence_source"] for s in handle.stats] == ["structure"] * STEPS
    with qsilk.enable(pipe, confidence=None, **TIGHT) as handle:
        run(pipe, STEPS)
    assert [s["confidence_source"] for s in handle.stats] == [None] * STEPS
    # a fast attention backend that bypasses SDPA: the fallback and its reason, in every step's record
    pipe.unet.set_attn_processor(AttnProcessor())
    with pytest.warns(RuntimeWarning), qsilk.enable(pipe, confidence="attention", **TIGHT) as handle:
        run(pipe, STEPS)
    layers = len(handle.probe.layers)
    for entry in handle.stats:
        source = entry["confidence_source"]
        assert source.startswith(
            f"structure (fallback: {layers} of {layers} probed layers recorded nothing"
        ), source
        assert "no scaled_dot_product_attention call seen" in source
        assert source.count("(") == 1 and source.endswith(")")  # one "(fallback: ...)", easy to parse
    json.loads(json.dumps(handle.stats, allow_nan=False))


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

    pipe = tiny_demo_pipeline(DDIMScheduler)  # its DiT is perturbed away from zero: attention has structure
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
