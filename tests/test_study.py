"""qsilk study: spec and cells, paired bootstrap (parity with the metrics' own scores), a tiny grid end to end with
report, resume after SIGKILL with byte-identical results, 2 accelerate processes = 1 process, CLI errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from conftest import write_idx  # noqa: E402
from qsilk.eval.metrics import frechet_distance, frechet_distance_gaussians, kid_unbiased  # noqa: E402
from qsilk.study.bootstrap import (  # noqa: E402
    FrechetReplicates,
    bootstrap_indices,
    paired_interval,
    replicate_scorer,
    replicate_table,
)
from qsilk.study.grid import Cell, StudySpec  # noqa: E402

TESTS = Path(__file__).parent
METRICS = ["spectral", "saturation", "study_plugins:TinyFrechet"]


# ---------------------------------------------------------------------------------------------- bootstrap


@pytest.mark.parametrize("n,d", [(40, 8), (24, 64)])  # n > D (D x D route) and n <= D (Gram route)
def test_frechet_replicates_match_the_metric_functions(n, d):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 1.5 + 0.3
    ref = torch.randn(3 * n, d, generator=g, dtype=torch.float64)
    fast = FrechetReplicates(x, ref, block=17)  # blocks smaller than the reference: the blocked KID sum
    for idx in [np.arange(n), *bootstrap_indices(n, 3, seed=1)]:  # with duplicated rows
        xi = x[torch.as_tensor(idx)]
        got = fast(idx)
        assert got["fd"] == pytest.approx(frechet_distance(ref, xi), rel=1e-7)
        mu, cov = xi.mean(0), torch.cov(xi.T)
        assert got["fd"] == pytest.approx(frechet_distance_gaussians(ref.mean(0), torch.cov(ref.T), mu, cov), rel=1e-7)
        assert got["kid"] == pytest.approx(kid_unbiased(ref, xi), rel=1e-9, abs=1e-12)


def test_replicate_scorer_uses_the_metrics_score_for_other_metrics():
    from qsilk.eval.metrics import Saturation

    metric = Saturation()
    feats = metric.features(torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    scorer = replicate_scorer(metric, feats, None)
    idx = bootstrap_indices(10, 4, seed=2)
    table = replicate_table(scorer, idx)
    for r, i in enumerate(idx):
        assert table["saturation"][r] == metric.score(feats[torch.as_tensor(i)])["saturation"]


def test_bootstrap_indices_and_paired_intervals():
    a, b = bootstrap_indices(50, 20, seed=3), bootstrap_indices(50, 20, seed=3)
    assert np.array_equal(a, b) and a.min() >= 0 and a.max() < 50
    assert not np.array_equal(a, bootstrap_indices(50, 20, seed=4))
    x = np.random.default_rng(0).normal(size=400)
    assert paired_interval(x, x) == (0.0, 0.0)  # identical methods: no difference, no width
    lo, hi = paired_interval(x + 2.0, x)
    assert lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    lo, hi = paired_interval(x, np.zeros_like(x), level=0.9)
    assert lo == pytest.approx(np.percentile(x, 5)) and hi == pytest.approx(np.percentile(x, 95))
    with pytest.raises(ValueError):
        bootstrap_indices(1, 10)


# ---------------------------------------------------------------------------------------------- spec


def test_spec_cells_baseline_first_and_json_round_trip():
    spec = StudySpec.from_dict(
        {
            "blocks": [
                {"methods": ["fdg+qsilk", "apg"], "steps": [8, 4], "cfg": [6, 9]},
                {"methods": ["qsilk"], "steps": [32], "cfg": [3], "schedulers": ["dpm"]},
                {"methods": ["apg"], "steps": [4], "cfg": [6]},  # a repeated cell is kept once
            ],
            "n": 10,
            "chunk": 4,
        }
    )
    cells = spec.cells()
    assert len(cells) == len(set(cells)) == 2 * 2 * 3 + 2
    assert cells[0] == Cell("dpm", 4, 6.0, "cfg") and cells[0].key == "dpm-s4-cfg6-cfg"
    for group in {c.group for c in cells}:
        assert Cell(*group, "cfg") in cells
    assert spec.chunks() == [(0, 4), (4, 4), (8, 2)]
    again = StudySpec.from_json(spec.to_json())
    assert again.cells() == cells and again.fixed() == spec.fixed()


@pytest.mark.parametrize(
    "data,match",
    [
        ({"blocks": [{"methods": ["nope"], "steps": [4], "cfg": [6]}]}, "unknown method"),
        ({"blocks": [{"methods": ["apg"], "steps": [0], "cfg": [6]}]}, "steps must be"),
        ({"blocks": [{"methods": ["apg"], "steps": [4]}]}, "needs 'cfg'"),
        ({"blocks": [{"methods": ["apg"], "steps": [4], "cfg": [6]}], "n": 1}, "n >= 2"),
        ({"blocks": [{"methods": ["apg"], "steps": [4], "cfg": [6]}], "bogus": 1}, "unknown study spec key"),
        ({"blocks": []}, "at least one grid block"),
        ({"blocks": [{"methods": ["apg"], "steps": [4], "cfg": [6], "schedulers": ["../x"]}]}, "identifiers"),
    ],
)
def test_spec_errors(data, match):
    with pytest.raises(ValueError, match=match):
        StudySpec.from_dict(data)


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def study_env(tmp_path_factory):
    """A tiny random demo pipeline on disk and a fake Fashion-MNIST; the environment for subprocess runs."""
    from test_guiders import tiny_demo_pipeline

    root = tmp_path_factory.mktemp("study")
    tiny_demo_pipeline().save_pretrained(root / "demo")
    data = root / "fmnist"
    data.mkdir()
    write_idx(data, "train", 16, 0)
    write_idx(data, "test", 16, 1)
    env = dict(os.environ)
    env.update(
        QSILK_FASHION_MNIST=str(data),
        PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    return root, env


def study_args(root: Path, out: Path, steps="2 6", methods=("qsilk-strong", "cfg-guider", "cfg-guider+qsilk-strong"), report=False, n=6,
               metrics=METRICS) -> list[str]:  # fmt: skip
    return [
        "--out", str(out), "--model", str(root / "demo"), "--methods", *methods, "--steps", *steps.split(),
        "--cfg", "4", "--n", str(n), "--chunk", "2", "--ref-n", "12", "--bootstrap", "40",
        "--metrics", *metrics, *([] if report else ["--no-report"]),
    ]  # fmt: skip


def run_study(env, args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qsilk.study", *args], env=env, capture_output=True, text=True, timeout=600, **kwargs
    )


@pytest.fixture(scope="module")
def finished(study_env, tmp_path_factory):
    """One complete tiny study (subprocess, like a user would run it)."""
    root, env = study_env
    out = tmp_path_factory.mktemp("finished") / "study"
    result = run_study(env, study_args(root, out, report=True))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_tiny_study_writes_results_and_report(finished):
    results = json.loads((finished / "results.json").read_text())
    assert not results["incomplete"]
    keys = sorted(c["key"] for c in results["cells"])
    methods = ("cfg", "cfg-guider", "cfg-guider+qsilk-strong", "qsilk-strong")
    assert keys == [f"dpm-s{s}-cfg4-{m}" for s in (2, 6) for m in methods]
    assert all(c["n"] == 6 for c in results["cells"])
    rows = results["comparisons"]
    assert {r["key"] for r in rows} >= {"fd_pool", "kid_pool", "spectral_hf_gap", "saturation"}
    # cfg-guider draws exactly the baseline's images: every paired difference and interval is exactly 0
    same = [r for r in rows if r["method"] == "cfg-guider"]
    assert same and all(r["delta"] == 0 and r["ci_low"] == 0 and r["ci_high"] == 0 for r in same)
    # QSilk strong changes the images, so at least one metric moves
    assert any(r["delta"] != 0 for r in rows if r["method"] == "qsilk-strong")
    for r in rows:
        assert r["delta"] == pytest.approx(r["value"] - r["baseline_value"])
    # compositions: what each part adds. The guider draws plain CFG's images, so "cfg-guider+qsilk-strong vs
    # cfg-guider" must be exactly "qsilk-strong vs cfg" (same replicates), and "... vs qsilk-strong" exactly 0.
    added = results["compositions"]
    assert {r["baseline"] for r in added} == {"cfg-guider", "qsilk-strong"}
    assert all(r["method"] == "cfg-guider+qsilk-strong" for r in added)
    alone = {(r["steps"], r["metric"], r["key"]): r for r in rows if r["method"] == "qsilk-strong"}
    for r in added:
        twin = alone[(r["steps"], r["metric"], r["key"])]
        if r["baseline"] == "cfg-guider":
            assert (r["delta"], r["ci_low"], r["ci_high"]) == (twin["delta"], twin["ci_low"], twin["ci_high"])
        else:
            assert r["delta"] == 0 and r["ci_low"] == 0 and r["ci_high"] == 0
    # the stored images are the baseline images the pipeline draws for seeds 0..5 (classes i mod 10)
    from safetensors.torch import load_file

    chunk = load_file(str(finished / "cells" / "dpm-s2-cfg4-cfg" / "chunk-0000002-00002.safetensors"))
    assert chunk["images"].shape[0] == 2 and chunk["images"].dtype == torch.uint8
    record = next(c for c in results["cells"] if c["method"] == "qsilk-strong")["record"]
    assert record["method"]["parts"][0]["params"]["clamp_quantile"] == 0.01
    assert record["scheduler_config"]["prediction_type"] == "v_prediction"
    csv_lines = (finished / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("scheduler,steps,cfg,method,baseline,metric,key,value")
    baselines = [c for c in results["cells"] if c["method"] == "cfg"]
    assert len(csv_lines) == 1 + len(rows) + len(results["compositions"]) + sum(len(c["scores"]) for c in baselines)
    provenance = json.loads((finished / "provenance.json").read_text())
    assert set(provenance["code"]) == set(keys) and all(v[0]["qsilk"] for v in provenance["code"].values())
    page = (finished / "report" / "index.html").read_text()
    assert "Differences to plain CFG" in page and "corner-grid.png" in page
    for name in ("corner-grid.png", "corner-spectra.png", "delta-dpm-spectral-spectral_hf_gap.png"):
        assert (finished / "report" / name).stat().st_size > 1000


def test_tradeoff_points_are_each_methods_rows(finished):
    from qsilk.study.report import tradeoff_points

    results = json.loads((finished / "results.json").read_text())
    points = tradeoff_points(results)
    assert set(points) == {("dpm", 2, 4.0), ("dpm", 6, 4.0)}
    for (scheduler, steps, cfg), (y_key, pts) in points.items():
        assert y_key == "fd_pool"  # no FID measured: the first Frechet key
        rows = {(r["method"], r["key"]): r for r in results["comparisons"] if (r["steps"], r["cfg"]) == (steps, cfg)}
        assert [p["method"] for p in pts] == ["cfg-guider", "cfg-guider+qsilk-strong", "qsilk-strong"]
        for p in pts:
            for axis, key in (("x", "spectral_hf_gap"), ("y", "fd_pool")):
                r = rows[(p["method"], key)]
                assert (p[axis], p[f"{axis}_lo"], p[f"{axis}_hi"]) == (r["delta"], r["ci_low"], r["ci_high"])
        name = f"tradeoff-{scheduler}-s{steps}-cfg{cfg:g}.png"
        assert (finished / "report" / name).stat().st_size > 1000
        assert name in (finished / "report" / "index.html").read_text()


def test_tradeoff_points_prefer_fid_and_need_the_hf_gap():
    from qsilk.study.report import tradeoff_points

    def row(method, key, delta, steps=4):
        return {"scheduler": "dpm", "steps": steps, "cfg": 6.0, "method": method, "key": key, "delta": delta,
                "ci_low": delta - 1, "ci_high": delta + 1, "excludes_zero": abs(delta) > 1}  # fmt: skip

    rows = [row("a", "fid", -3.0), row("a", "fd_x", 2.0), row("a", "spectral_hf_gap", 0.5), row("b", "fid", 1.0),
            row("a", "fid", 1.0, steps=8)]  # fmt: skip
    points = tradeoff_points({"comparisons": rows})
    assert list(points) == [("dpm", 4, 6.0)]  # 8 steps has no HF gap
    y_key, pts = points[("dpm", 4, 6.0)]
    assert y_key == "fid" and [p["method"] for p in pts] == ["a"]  # b has no HF gap
    assert (pts[0]["x"], pts[0]["y"], pts[0]["y_lo"], pts[0]["sig"]) == (0.5, -3.0, -4.0, (False, True))


def test_markdown_tables_of_a_finished_study(finished, capsys):
    from qsilk.study.__main__ import main

    assert main(["--out", str(finished), "--table", "fd_pool", "spectral_hf_gap"]) == 0
    text = capsys.readouterr().out
    assert text.count("| plain CFG (value) |") == 2  # 2 and 6 steps
    assert "| cfg-guider | +0 [+0, +0] | +0 [+0, +0] |" in text
    assert "| method | fd_pool | spectral_hf_gap |" in text
    assert text.count("| cfg-guider+qsilk-strong vs cfg-guider |") == 2


def test_stored_images_reproduce_with_the_pipeline(finished, study_env):
    from safetensors.torch import load_file

    from qsilk.models.demo import load_demo_pipeline
    from qsilk.study.methods import get_method
    from qsilk.study.runner import to_uint8

    root, _ = study_env
    pipe = load_demo_pipeline(path=root / "demo")
    pipe.set_progress_bar_config(disable=True)
    with get_method("qsilk-strong").sampling(pipe, 4.0) as kwargs:
        images = pipe([2, 3], num_inference_steps=2, output_type="pt",
                      generator=[torch.Generator().manual_seed(s) for s in (2, 3)], **kwargs).images  # fmt: skip
    chunk = load_file(str(finished / "cells" / "dpm-s2-cfg4-qsilk-strong" / "chunk-0000002-00002.safetensors"))
    assert torch.equal(chunk["images"], to_uint8(images))


def test_resume_after_sigkill_is_byte_identical(finished, study_env, tmp_path):
    root, env = study_env
    out = tmp_path / "killed"
    args = study_args(root, out, report=True)  # the finished study's command
    proc = subprocess.Popen([sys.executable, "-m", "qsilk.study", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(list(out.glob("cells/*/chunk-*.safetensors"))) < 3:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = sorted(p.relative_to(out) for p in out.glob("cells/*/chunk-*.safetensors"))
    assert 3 <= len(done) < 18 and not (out / "results.json").exists(), done  # killed mid-run
    result = run_study(env, args)  # the same command resumes
    assert result.returncode == 0, result.stderr[-3000:]
    for path in done:  # finished chunks were kept, not redone
        cell, chunk = path.parts[-2], path.name
        assert f"{cell} {int(chunk.split('-')[1])} " not in result.stderr
    for name in ("results.json", "results.csv"):
        assert (out / name).read_bytes() == (finished / name).read_bytes()


def test_accelerate_two_processes_give_the_same_numbers(finished, study_env, tmp_path):
    pytest.importorskip("accelerate")
    root, env = study_env
    out = tmp_path / "two"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "qsilk.study"]  # fmt: skip
    result = subprocess.run([*launch, *study_args(root, out), "--no-progress"], env=env, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("results.json", "results.csv"):
        assert (out / name).read_bytes() == (finished / name).read_bytes()
    # two processes really shared the work (a launcher that starts one process would pass the check above too)
    from safetensors import safe_open

    writers = set()
    for chunk in (out / "cells").glob("*/chunk-*.safetensors"):
        with safe_open(str(chunk), "pt") as f:
            writers.add(f.metadata()["process"])
    assert writers == {"0/2", "1/2"}


def test_resume_refuses_a_different_fixed_setting(finished, study_env, tmp_path):
    root, env = study_env
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    args = study_args(root, out)
    args[args.index("--ref-n") + 1] = "8"
    result = run_study(env, args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "different fixed settings" in lines[-1] and "Traceback" not in result.stderr


def test_cells_metrics_and_n_grow_to_the_same_numbers(finished, study_env, tmp_path):
    """A smaller study (fewer cells, metrics, seeds) grown to the finished one's grid gives its exact results: a
    metric added later is computed from the stored images of finished chunks, not by sampling again."""
    root, env = study_env
    out = tmp_path / "grown"
    small = run_study(env, study_args(root, out, steps="2", n=4, metrics=METRICS[:2]))
    assert small.returncode == 0, small.stderr[-2000:]
    result = run_study(env, study_args(root, out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dpm-s2-cfg4-cfg 0 +study_plugins:TinyFrechet" in result.stderr  # features added from stored images
    assert "dpm-s2-cfg4-cfg 4 (" in result.stderr and "dpm-s6-cfg4-cfg 0 (" in result.stderr  # new seeds, cells
    assert (out / "results.csv").read_bytes() == (finished / "results.csv").read_bytes()
    grown, full = (json.loads((d / "results.json").read_text()) for d in (out, finished))
    assert len(grown["study"].pop("blocks")) == 2 and len(full["study"].pop("blocks")) == 1  # how it was asked
    assert grown["study"] == full["study"]
    assert grown["cells"] == full["cells"]
    assert grown["comparisons"] == full["comparisons"]
    assert grown == full


@pytest.mark.parametrize(
    "args,match",
    [
        (["--methods", "apg", "--steps", "4", "--cfg", "6"], "--out is required"),
        (["--out", "{out}", "--methods", "nope", "--steps", "4", "--cfg", "6"], "unknown method part"),
        (["--out", "{out}", "--methods", "apg", "--steps", "4"], "needs --cfg"),
        (["--out", "{out}", "--spec", "{{not json"], "malformed study spec"),
        (["--out", "{out}"], "no grid"),
    ],
)
def test_cli_errors_are_one_line(args, match, tmp_path, capsys):
    from qsilk.study.__main__ import main

    code = main([a.format(out=tmp_path / "o") for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and match in err[0]
    assert not (tmp_path / "o").exists()


def test_qsilk_study_subcommand(capsys):
    from qsilk.cli import main

    assert main(["study", "--list"]) == 0
    out = capsys.readouterr().out
    assert "fdg" in out and "qsilk-attention" in out and "compose" in out
