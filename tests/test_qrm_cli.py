"""`qsilk generate --qrm`: bad paths and backbone mismatches are one error line; the QRM is recorded in each
image's reproduction parameters and its reproduce command; a zero QRM gives the same pixels under a new key."""

from __future__ import annotations

import json

import pytest
import torch

from qsilk.qrm import QRM, QRMConfig, save_qrm

pytestmark = pytest.mark.skipif(
    not __import__("qsilk.models.demo", fromlist=["demo_weights_available"]).demo_weights_available(),
    reason="demo weights not installed",
)


def _generate(args):
    from qsilk.cli import main

    return main(["generate", "--steps", "2", "--seed", "0", "--class", "Dress", "--no-qsilk", *args])


def test_generate_qrm_bad_input(tmp_path, capsys):
    assert _generate(["--qrm", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --qrm: no QRM checkpoint at")
    from tiny_pipelines import tiny_dit_pipeline

    other = QRM(QRMConfig.for_transformer(tiny_dit_pipeline().transformer, "light"))
    save_qrm(other, tmp_path / "other")
    assert _generate(["--qrm", str(tmp_path / "other.safetensors"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config hash" in err[0]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.png"))


def test_generate_records_qrm(tmp_path):
    from qsilk.models.demo import load_demo_pipeline

    transformer = load_demo_pipeline().transformer
    save_qrm(
        QRM(QRMConfig.for_transformer(transformer, "light")), tmp_path / "zero"
    )  # zero output: no change
    assert _generate(["--out", str(tmp_path / "plain")]) == 0
    assert _generate(["--qrm", str(tmp_path / "zero.safetensors"), "--out", str(tmp_path / "q")]) == 0
    (plain_json,) = (tmp_path / "plain").rglob("*.json")
    (qrm_json,) = (tmp_path / "q").rglob("*.json")
    record = json.loads(qrm_json.read_text())
    text = json.dumps(record)
    assert "--qrm" in text and str((tmp_path / "zero.safetensors").resolve()) in text
    assert plain_json.name != qrm_json.name  # the QRM is part of the image's identity
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(plain_json.with_suffix(".png")))
    b = np.asarray(Image.open(qrm_json.with_suffix(".png")))
    assert np.array_equal(a, b)


def test_shipped_demo_qrm_fits_the_demo_model_and_detaches_exactly():
    from qsilk.models.demo import load_demo_pipeline
    from qsilk.qrm import attach, demo_qrm_path, detach, load_demo_qrm

    if not demo_qrm_path().exists():
        pytest.skip("no shipped demo QRM")
    pipe = load_demo_pipeline()
    pipe.set_progress_bar_config(disable=True)
    qrm = load_demo_qrm(pipe.transformer)
    assert qrm.config.kind == "light" and qrm.num_parameters() <= 0.02 * qrm.config.backbone_params
    assert demo_qrm_path().stat().st_size + demo_qrm_path().with_suffix(".json").stat().st_size < 1_000_000

    def sample():
        return pipe(
            [3, 7], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent"
        ).images

    base = sample()
    attach(pipe, qrm)
    moved = sample()
    detach(pipe)
    assert not torch.equal(moved, base)
    assert torch.equal(sample(), base)
