"""`qsilk compare --qrm`: a bad --qrm is one error line before any model load; with it, the comparison gets a
"qrm" column and a QRM variant of each QSilk column, each image records whether the QRM made it, the columns
without QRM are bit-identical to a run without --qrm, and the "qrm" column equals `generate --qrm`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.skipif(
    not __import__("qsilk.models.demo", fromlist=["demo_weights_available"]).demo_weights_available(),
    reason="demo weights not installed",
)

COMMON = ["--steps", "2", "--seed", "0", "--class", "Dress", "--threads", "1"]


def _main(args):
    from qsilk.cli import main

    return main(args)


def _png(folder):
    (path,) = folder.glob("*.png")
    return np.asarray(Image.open(path)), json.loads(path.with_suffix(".json").read_text())


def test_compare_qrm_bad_path_is_one_error_line_before_loading(tmp_path, capsys, monkeypatch):
    from qsilk.cli import models

    def no_load(*a, **k):
        raise AssertionError("model loaded before --qrm was checked")

    monkeypatch.setattr(models, "load_pipeline", no_load)
    code = _main(
        ["compare", *COMMON, "--qrm", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "o")]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --qrm: no QRM checkpoint at")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.png"))


def test_compare_qrm_columns(tmp_path):
    from qsilk.qrm import demo_qrm_path

    if not demo_qrm_path().exists():
        pytest.skip("no shipped demo QRM")
    assert _main(["compare", *COMMON, "--out", str(tmp_path / "base")]) == 0
    assert _main(["compare", *COMMON, "--qrm", "demo", "--out", str(tmp_path / "q")]) == 0
    summary = json.loads((tmp_path / "q" / "compare.json").read_text())
    columns = {c["label"]: c for c in summary["configs"]}
    assert list(columns) == ["plain", "qsilk defaults", "qrm", "qrm + qsilk defaults"]
    assert [c["qrm"] for c in columns.values()] == [False, False, True, True]
    assert summary["qrm"]["path"] == "demo" and summary["qrm"]["kind"] == "light"
    page = (tmp_path / "q" / "index.html").read_text()
    assert "QRM" in page and summary["qrm"]["sha256"] in page

    images = {c["label"]: _png(tmp_path / "q" / "images" / c["folder"]) for c in summary["configs"]}
    for label, (_, record) in images.items():
        assert ("qrm" in record["params"]) == columns[label]["qrm"], label
        assert ("--qrm" in json.dumps(record)) == columns[label]["qrm"], label
    # Columns without QRM: the same pixels and keys as a comparison made without --qrm (the handle is disabled).
    base = json.loads((tmp_path / "base" / "compare.json").read_text())
    for col in base["configs"]:
        pixels, record = _png(tmp_path / "base" / "images" / col["folder"])
        assert np.array_equal(pixels, images[col["label"]][0])
        assert record["key"] == images[col["label"]][1]["key"]
    # The QRM columns really differ, and the "qrm" column is what `generate --qrm demo --no-qsilk` makes.
    assert not np.array_equal(images["qrm"][0], images["plain"][0])
    assert not np.array_equal(images["qrm + qsilk defaults"][0], images["qsilk defaults"][0])
    assert (
        _main(
            ["generate", *COMMON, "--cfg", "7", "--no-qsilk", "--qrm", "demo", "--out", str(tmp_path / "g")]
        )
        == 0
    )
    pixels, record = _png(tmp_path / "g")
    assert np.array_equal(pixels, images["qrm"][0])
    assert record["params"] == images["qrm"][1]["params"]
