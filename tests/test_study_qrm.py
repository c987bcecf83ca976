"""Study methods "qrm-light" and "qrm-light+qsilk": the shipped light QRM is attached to the demo pipeline for the
cell only; it changes the images, composes with QSilk exactly as attaching by hand does, and leaving the cell (also
by an exception) restores the plain pipeline bit-identically."""

from __future__ import annotations

import json

import pytest
import torch

from qsilk.study.methods import get_method

pytestmark = pytest.mark.skipif(
    not __import__("qsilk.models.demo", fromlist=["demo_weights_available"]).demo_weights_available(),
    reason="demo weights not installed",
)
CFG = 4.0


@pytest.fixture(scope="module")
def pipe():
    from qsilk.models.demo import load_demo_pipeline
    from qsilk.qrm import demo_qrm_path

    if not demo_qrm_path().exists():
        pytest.skip("no shipped demo QRM")
    torch.set_num_threads(1)
    pipe = load_demo_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, **kwargs):
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    return pipe([3, 7], num_inference_steps=3, generator=gens, output_type="latent", **kwargs).images


def _hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_qrm_methods_change_images_and_detach_exactly(pipe):
    import qsilk
    from qsilk.qrm import attach, attached, load_demo_qrm

    hooks = _hook_count(pipe.transformer)
    with get_method("cfg").sampling(pipe, CFG) as kwargs:
        plain = sample(pipe, **kwargs)
    with get_method("qrm-light").sampling(pipe, CFG) as kwargs:
        assert attached(pipe) is not None
        qrm = sample(pipe, **kwargs)
    assert attached(pipe) is None and _hook_count(pipe.transformer) == hooks
    assert not torch.equal(qrm, plain)
    with get_method("cfg").sampling(pipe, CFG) as kwargs:
        assert torch.equal(sample(pipe, **kwargs), plain)

    with get_method("qsilk").sampling(pipe, CFG) as kwargs:
        qsilk_only = sample(pipe, **kwargs)
    with get_method("qrm-light+qsilk").sampling(pipe, CFG) as kwargs:
        both = sample(pipe, **kwargs)
    assert not torch.equal(both, qsilk_only) and not torch.equal(both, qrm)
    # The same composition built by hand gives the same latents.
    with attach(pipe, load_demo_qrm(pipe.transformer)), qsilk.enable(pipe, qsilk.QSilkConfig()):
        assert torch.equal(sample(pipe, guidance_scale=CFG), both)

    with pytest.raises(RuntimeError, match="boom"), get_method("qrm-light+qsilk").sampling(pipe, CFG):
        raise RuntimeError("boom")
    assert attached(pipe) is None and _hook_count(pipe.transformer) == hooks
    with get_method("cfg").sampling(pipe, CFG) as kwargs:
        assert torch.equal(sample(pipe, **kwargs), plain)


def test_qrm_method_record():
    record = get_method("qrm-light+qsilk").record(CFG)
    assert json.loads(json.dumps(record))["name"] == "qrm-light+qsilk"
    (qrm_part,) = [p for p in record["parts"] if p["kind"] == "qrm"]
    assert qrm_part["params"]["checkpoint"] == "demo_qrm_light.safetensors"
    assert len(qrm_part["params"]["sha256"]) == 12
