"""qsilk CLI with the demo pipeline (a tiny random-weight copy saved to disk): generate, resume, determinism,
parity with a direct pipeline call, bad input (one line, exit 2, nothing written), compare, info."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("typer")
pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import qsilk  # noqa: E402
from qsilk.cli import app  # noqa: E402
from qsilk.cli.runs import read_png_record  # noqa: E402
from tiny_pipelines import tiny_demo_pipeline  # noqa: E402

STEPS = "3"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """A tiny demo pipeline (random weights, perturbed DiT: images depend on class, seed and QSilk) saved to disk."""
    from diffusers import DDIMScheduler

    folder = tmp_path_factory.mktemp("tiny-demo") / "demo"
    tiny_demo_pipeline(DDIMScheduler).save_pretrained(folder)
    return folder


runner = CliRunner()


def cli(*args, env: dict | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def ok(*args, env: dict | None = None):
    result = cli(*args, env=env)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def gen(demo_dir: Path, out: Path, *extra):
    return ok("generate", "--model", demo_dir, "--steps", STEPS, "--device", "cpu", "--out", out, *extra)


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ---------------------------------------------------------------------------------------------- generate


def test_generate_writes_png_with_record_and_sidecar(demo_dir, tmp_path):
    result = gen(demo_dir, tmp_path / "out", "--class", "Dress", "--class", "7", "--seed", "0-1", "--cfg", "5")
    assert "4 image(s) written" in result.stdout
    files = pngs(tmp_path / "out")
    assert len(files) == 4
    names = [f.name for f in files]
    assert sum(n.startswith("dress-seed0-") for n in names) == 1
    assert sum(n.startswith("sneaker-seed1-") for n in names) == 1
    for png in files:
        record = read_png_record(png)
        sidecar = json.loads(png.with_suffix(".json").read_text())
        assert {k: sidecar[k] for k in record} == record  # the sidecar repeats the PNG record ...
        assert set(sidecar) - set(record) == {"file", "seconds", "created"}  # ... and adds timings
        params = record["params"]
        assert params["class_id"] in (3, 7) and params["class_name"] in ("Dress", "Sneaker")
        assert params["seed"] in (0, 1) and params["steps"] == 3 and params["cfg"] == 5.0
        assert params["scheduler"] == "DDIMScheduler" and params["pipeline"] == "QSilkDemoPipeline"
        assert params["scheduler_config"]["prediction_type"] == "v_prediction"
        assert params["model"] == {"spec": str(demo_dir), "kind": "folder", "location": str(demo_dir.resolve())}
        assert params["qsilk"] == qsilk.QSilkConfig().to_dict()
        assert set(record["versions"]) >= {"qsilk", "torch", "diffusers", "python"}
        stats = record["stats"]
        assert stats["steps"] == 3 and len(stats["per_step"]) == 3
        assert [s["step"] for s in stats["per_step"]] == [0, 1, 2]
        assert 0.0 <= stats["touched_fraction_mean"] <= 1.0
        assert stats["max_abs_after"] <= stats["max_abs_before"] + 1e-6
        assert record["key"] in png.name
        assert record["reproduce"].startswith("qsilk generate --model ")


def test_generate_matches_a_direct_pipeline_call(demo_dir, tmp_path):
    """The CLI's pixels equal an independent call: the pipeline + qsilk.enable + a per-seed CPU generator."""
    from qsilk.models.demo import QSilkDemoPipeline

    gen(demo_dir, tmp_path / "q", "--class", "Bag", "--seed", "5", "--cfg", "6", "--quantile", "0.01")
    gen(demo_dir, tmp_path / "p", "--class", "Bag", "--seed", "5", "--cfg", "6", "--no-qsilk")
    pipe = QSilkDemoPipeline.from_pretrained(demo_dir)
    pipe.set_progress_bar_config(disable=True)

    def direct() -> np.ndarray:
        g = torch.Generator("cpu").manual_seed(5)
        image = pipe([8], num_inference_steps=3, guidance_scale=6.0, generator=g, output_type="np").images[0]
        return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)

    plain = direct()
    with qsilk.enable(pipe, qsilk.QSilkConfig(clamp_quantile=0.01)):
        stabilised = direct()
    (q_png,), (p_png,) = pngs(tmp_path / "q"), pngs(tmp_path / "p")
    np.testing.assert_array_equal(pixels(q_png), stabilised)
    np.testing.assert_array_equal(pixels(p_png), plain)
    record = read_png_record(p_png)
    assert record["params"]["qsilk"] is None and record["stats"] is None
    assert "--no-qsilk" in record["reproduce"]


def test_same_arguments_same_bytes_and_no_dependence_on_batch_mates(demo_dir, tmp_path):
    args = ("--class", "Trouser", "--class", "Coat", "--seed", "2-3", "--scheduler", "ddpm")
    gen(demo_dir, tmp_path / "a", *args)
    gen(demo_dir, tmp_path / "b", *args)
    a, b = pngs(tmp_path / "a"), pngs(tmp_path / "b")
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 4
    for x, y in zip(a, b, strict=True):
        assert x.read_bytes() == y.read_bytes()
    # One image alone (other class, other seeds absent) is byte-identical to the same image in the larger run.
    gen(demo_dir, tmp_path / "c", "--class", "Coat", "--seed", "3", "--scheduler", "ddpm")
    (alone,) = pngs(tmp_path / "c")
    assert alone.read_bytes() == (tmp_path / "a" / alone.name).read_bytes()
    assert read_png_record(alone)["params"]["scheduler"] == "DDPMScheduler"  # stochastic steps: per-seed noise


def test_qsilk_options_and_config_file(demo_dir, tmp_path):
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"clamp_quantile": 0.02, "aqclip_tile": 8, "aqclip_stride": 4, "ema": 0.5}))
    gen(demo_dir, tmp_path / "o", "-c", "0", "--config", config, "--tile", "4", "--k-max", "5", "--mode", "hard",
        "--confidence", "none")  # fmt: skip
    (png,) = pngs(tmp_path / "o")
    cfg = read_png_record(png)["params"]["qsilk"]
    expected = qsilk.QSilkConfig(
        clamp_quantile=0.02, aqclip_tile=4, aqclip_stride=4, ema=0.5, aqclip_k_max=5.0, clamp_mode="hard",
        confidence=None,
    )  # fmt: skip
    assert cfg == expected.to_dict()  # the file sets, flags override
    # Inline JSON works too and the reproduce command uses it: running it again gives the same bytes.
    command = shlex.split(read_png_record(png)["reproduce"])
    assert command[:2] == ["qsilk", "generate"]
    ok(*command[1:], "--out", tmp_path / "again")
    (png2,) = pngs(tmp_path / "again")
    assert png2.read_bytes() == png.read_bytes()


def test_aggressive_qsilk_changes_the_image(demo_dir, tmp_path):
    gen(demo_dir, tmp_path / "p", "-c", "4", "--no-qsilk")
    gen(demo_dir, tmp_path / "q", "-c", "4", "--mode", "hard", "--quantile", "0.2", "--k-min", "0", "--k-max", "0.5")
    (p,), (q,) = pngs(tmp_path / "p"), pngs(tmp_path / "q")
    assert not np.array_equal(pixels(p), pixels(q))
    assert read_png_record(q)["stats"]["touched_fraction_mean"] > 0.1


def test_resume_skips_finished_images_and_redoes_unfinished(demo_dir, tmp_path):
    out = tmp_path / "out"
    args = ("--class", "Shirt", "--seed", "0-2")
    gen(demo_dir, out, *args)
    files = pngs(out)
    stamps = {p: p.stat().st_mtime_ns for p in files}
    result = gen(demo_dir, out, *args)
    assert "0 image(s) written, 3 already done" in result.stdout
    assert result.stderr.splitlines() == [f"3 of 3 image(s) already done in {out}; reusing them"]  # one line
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    # An image whose sidecar is missing (interrupted before it was written) is made again, byte-identical.
    victim = files[1]
    original = victim.read_bytes()
    victim.with_suffix(".json").unlink()
    result = gen(demo_dir, out, *args)
    assert "1 image(s) written, 2 already done" in result.stdout
    assert victim.read_bytes() == original
    # Different parameters are different files; nothing is overwritten.
    gen(demo_dir, out, "--class", "Shirt", "--seed", "0", "--cfg", "2")
    assert len(pngs(out)) == 4
    assert not list(out.glob(".*"))  # no temp files left behind


def test_default_model_comes_from_env_and_missing_weights_say_so(demo_dir, tmp_path):
    ok("generate", "--steps", STEPS, "--device", "cpu", "-c", "1", "--out", tmp_path / "o",
       env={"QSILK_DEMO_MODEL": str(demo_dir)})  # fmt: skip
    (png,) = pngs(tmp_path / "o")
    assert read_png_record(png)["params"]["model"]["kind"] == "demo"
    assert "--model demo" in read_png_record(png)["reproduce"]
    result = cli("generate", "-c", "1", "--out", tmp_path / "x", env={"QSILK_DEMO_MODEL": str(tmp_path / "none")})
    assert result.exit_code == 2
    assert result.stderr.startswith("error: the demo model's weights are not installed")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_all_demo_classes_by_default(demo_dir, tmp_path):
    gen(demo_dir, tmp_path / "o", "--steps", "1")
    assert len(pngs(tmp_path / "o")) == 10


# ---------------------------------------------------------------------------------------------- bad input


BAD_INPUT = {
    "unknown model path": (["--model", "./no/such/model"], "model path ./no/such/model does not exist"),
    "model folder without index": (["--model", "{tmp}"], "is not a diffusers pipeline"),
    "model file of unknown type": (["--model", "{tmp}/weights.txt"], "unsupported type '.txt'"),
    "unknown scheduler": (["--scheduler", "warp9"], "unknown scheduler 'warp9'"),
    "not a scheduler class": (["--scheduler", "StableDiffusionPipeline"], "unknown scheduler"),
    "zero steps": (["--steps", "0"], "--steps must be a positive integer, got 0"),
    "negative steps": (["--steps", "-3"], "--steps must be a positive integer, got -3"),
    "steps not a number": (["--steps", "many"], "Invalid value for '--steps'"),
    "negative cfg": (["--cfg", "-1"], "--cfg must be a finite number >= 0"),
    "nan cfg": (["--cfg", "nan"], "--cfg must be a finite number >= 0"),
    "unknown class": (["--class", "Spaceship"], "unknown class 'Spaceship'"),
    "class id out of range": (["--class", "10"], "class id 10 is out of range 0..9"),
    "prompt for a class model": (["--prompt", "a cat"], "is class-conditional: use --class"),
    "empty prompt": (["--prompt", "  "], "--prompt must not be empty"),
    "class and prompt": (["--class", "1", "--prompt", "x"], "not both"),
    "size for a class model": (["--width", "64", "--height", "64"], "apply to text-to-image models only"),
    "size not multiple of 8": (["--width", "65", "--height", "64"], "--width must be a positive multiple of 8"),
    "bad seed": (["--seed", "a-b"], "invalid seed 'a-b'"),
    "reversed seed range": (["--seed", "7-3"], "end before start"),
    "output under a file": (["--out", "{tmp}/file.txt/sub"], "is not a folder"),
    "output on a read-only mount": (["--out", "/proc/qsilk-test-out"], "is not writable"),
    "malformed config": (["--config", "{tmp}/bad.json"], "malformed JSON in config file"),
    "missing config": (["--config", "{tmp}/nope.json"], "config file {tmp}/nope.json does not exist"),
    "unknown config key": (["--config", "{tmp}/unknown.json"], "unknown QSilk config key(s) ['clmap']"),
    "invalid config value": (["--config", '{"clamp_quantile": 0.7}'], "clamp_quantile must be in (0, 0.5)"),
    "config not an object": (["--config", "{tmp}/list.json"], "must hold a JSON object ({\"key\": value, ...}), not an array"),
    "inline config not an object": (["--config", "[]"], "inline --config JSON must hold a JSON object"),
    "inline config a number": (["--config", "3"], "inline --config JSON must hold a JSON object ({\"key\": value, ...}), not a number"),
    "unknown preset": (["--preset", "ultra"], "unknown preset 'ultra'; choose from default"),
    "scheduler that cannot take the steps": (["--scheduler", "PNDMScheduler"], "PNDMScheduler cannot run 2 step(s)"),
    "invalid flag value": (["--tile", "4", "--stride", "9"], "need 1 <= aqclip_stride <= aqclip_tile"),
    "bad mode": (["--mode", "medium"], "--mode must be one of soft, hard"),
    "bad confidence": (["--confidence", "vibes"], "--confidence must be one of"),
    "qsilk flags with --no-qsilk": (["--no-qsilk", "--tile", "8"], "given with --no-qsilk"),
    "unknown option": (["--bogus"], "No such option: --bogus"),
    "bad device": (["--device", "tpu"], "unknown device 'tpu'"),
    "bad dtype": (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    "zero threads": (["--threads", "0"], "--threads must be >= 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_nothing_written(case, demo_dir, tmp_path):
    args, message = BAD_INPUT[case]
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "weights.txt").write_text("x")
    (tmp_path / "bad.json").write_text('{"clamp_quantile": 0.01,')
    (tmp_path / "unknown.json").write_text('{"clmap": true}')
    (tmp_path / "list.json").write_text("[1, 2]")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    message = message.replace("{tmp}", str(tmp_path))
    base = ["--model", str(demo_dir), "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "out")]
    before = sorted(tmp_path.rglob("*"))
    for command in ("generate", "compare"):
        if case == "qsilk flags with --no-qsilk" and command == "compare":
            continue
        result = cli(command, *base, *args)
        assert result.exit_code == 2, (command, result.stdout, result.stderr)
        assert result.stderr.startswith("error: "), result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr, result.stderr
        assert "Traceback" not in result.stdout + result.stderr
        assert sorted(tmp_path.rglob("*")) == before  # nothing written, not even the output folder


def test_bad_input_through_the_console_script(tmp_path):
    """The real entry point (a subprocess): one stderr line, exit code 2."""
    code = "import sys; from qsilk.cli import main; sys.exit(main())"
    proc = subprocess.run(
        [sys.executable, "-c", code, "generate", "--steps", "0", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "QSILK_DEMO_MODEL": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: --steps must be a positive integer, got 0"
    assert not [line for line in proc.stderr.splitlines() if line.startswith("error")][1:]
    assert not (tmp_path / "o").exists()


def test_unexpected_errors_are_one_line_exit_1(demo_dir, tmp_path, monkeypatch):
    from qsilk.cli import runs

    def boom(images, what):
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setattr(runs, "_to_uint8", boom)
    monkeypatch.delenv("QSILK_DEBUG", raising=False)
    result = cli("generate", "--model", demo_dir, "-c", "1", "--steps", "2", "--device", "cpu", "--out", tmp_path)
    assert result.exit_code == 1
    last = result.stderr.splitlines()[-1]  # after the progress bar
    assert re.fullmatch(r"error: unexpected RuntimeError: kaboom; second line \(set QSILK_DEBUG=1.*\)", last)
    assert "Traceback" not in result.stderr


def test_help_lists_commands():
    result = ok("--help")
    for command in ("generate", "compare", "info"):
        assert command in result.stdout
    assert "--k-min" in ok("generate", "--help").stdout


# ---------------------------------------------------------------------------------------------- compare


def _links(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


def test_compare_writes_grid_heatmap_maps_and_page(demo_dir, tmp_path):
    out = tmp_path / "cmp"
    extra = tmp_path / "strong.json"
    extra.write_text(json.dumps({"clamp_mode": "hard", "clamp_quantile": 0.1, "aqclip_k_min": 0.5, "aqclip_k_max": 1.0}))
    result = ok("compare", "--model", demo_dir, "--class", "Dress", "--class", "Bag", "--seed", "0", "--steps", STEPS,
                "--device", "cpu", "--config", extra, "--out", out)  # fmt: skip
    assert "comparison written to" in result.stdout
    for name in ("grid.png", "diff.png", "stats.png", "steps.png", "index.html", "compare.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "compare.json").read_text())
    assert [c["label"] for c in summary["configs"]] == ["plain", "qsilk defaults", "strong"]
    assert [c["folder"] for c in summary["configs"]] == ["plain", "qsilk", "strong"]
    assert summary["rows"] == ["Dress / seed 0", "Bag / seed 0"]
    assert summary["steps"] == 3 and summary["cfg"] == 7.0
    plain, default, strong = summary["configs"]
    assert plain["config"] is None and plain["mae_vs_plain"] == 0.0
    assert default["config"] == qsilk.QSilkConfig().to_dict()
    assert strong["config"]["clamp_quantile"] == 0.1 and strong["touched_fraction_mean"] > 0.05
    # The plain column is `generate --no-qsilk`: same parameters (so the same file name) and the same pixels,
    # although its statistics were measured through a no-op QSilk config (bit-identical by contract).
    gen(demo_dir, tmp_path / "plain", "--class", "Bag", "--seed", "0", "--cfg", "7", "--no-qsilk")
    (plain_png,) = pngs(tmp_path / "plain")
    column_png = out / "images" / "plain" / plain_png.name
    np.testing.assert_array_equal(pixels(column_png), pixels(plain_png))
    assert read_png_record(column_png)["params"] == read_png_record(plain_png)["params"]
    assert read_png_record(column_png)["stats"]["steps"] == 3
    assert read_png_record(column_png)["stats"]["touched_fraction_mean"] == 0.0
    # Grid: 2 rows x (3 configs + 2 confidence columns), each tile 64 px upscaled x3.
    grid = Image.open(out / "grid.png")
    assert grid.width >= 5 * 192 and 2 * 192 <= grid.height < 3 * 192
    # Per-step maps were recorded for the QSilk columns.
    maps = np.load(next((out / "images" / "qsilk").glob("dress-*.maps.npz")))
    assert maps["confidence"].shape == (3, 16, 16) and maps["delta"].shape == (3, 16, 16)
    assert ((maps["confidence"] >= 0) & (maps["confidence"] <= 1)).all()
    # The page is self-contained and every relative link resolves.
    html = (out / "index.html").read_text()
    links = _links(html)
    assert {"grid.png", "diff.png", "stats.png", "steps.png", "compare.json"} <= set(links)
    assert all(not link.startswith(("http:", "https:", "/")) for link in links)
    assert all((out / link).is_file() for link in links)
    assert "<script" not in html and "strong" in html and "DDIMScheduler" in html
    # A second run resumes: every image is skipped, the page is rebuilt.
    result = ok("compare", "--model", demo_dir, "--class", "Dress", "--class", "Bag", "--seed", "0", "--steps", STEPS,
                "--device", "cpu", "--config", extra, "--out", out)  # fmt: skip
    assert "6 of 6 image(s) already done" in result.stderr and "made in" not in result.stderr


def test_compare_attention_confidence_maps_beside_images(demo_dir, tmp_path):
    out = tmp_path / "att"
    ok("compare", "--model", demo_dir, "--class", "Sandal", "--seed", "1", "--steps", "2", "--device", "cpu",
       "--confidence", "attention", "--out", out)  # fmt: skip
    summary = json.loads((out / "compare.json").read_text())
    assert summary["configs"][1]["config"]["confidence"] == "attention"
    maps = np.load(next((out / "images" / "qsilk").glob("*.maps.npz")))
    conf = maps["confidence"]
    assert conf.shape == (2, 16, 16) and np.isfinite(conf).all()
    assert ((conf >= 0) & (conf <= 1)).all() and conf.std() > 0  # a real entropy map, not a constant
    assert Image.open(out / "grid.png").width >= 3 * 192  # plain, qsilk, qsilk confidence


def test_compare_sample_out_of_range(demo_dir, tmp_path):
    result = cli("compare", "--model", demo_dir, "-c", "1", "--seed", "0-1", "--sample", "2", "--out", tmp_path / "o")
    assert result.exit_code == 2 and result.stderr == "error: --sample 2 is out of range: there are 2 rows\n"
    assert not (tmp_path / "o").exists()


def test_compare_defaults_use_demo_classes_and_folder(demo_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ok("compare", "--steps", "1", "--device", "cpu", "--seed", "0", env={"QSILK_DEMO_MODEL": str(demo_dir)})
    summary = json.loads((tmp_path / "qsilk-demo" / "compare.json").read_text())
    assert summary["rows"] == [f"{c} / seed 0" for c in ("T-shirt/top", "Trouser", "Dress", "Sneaker", "Bag")]
    assert summary["cfg"] == 7.0 and summary["model"]["kind"] == "demo"


# ---------------------------------------------------------------------------------------------- info


def test_info_reports_versions_device_and_demo_model(demo_dir, tmp_path):
    result = ok("info", env={"QSILK_DEMO_MODEL": str(demo_dir)})
    assert "torch" in result.stdout and "diffusers" in result.stdout and "python" in result.stdout
    assert "cuda available" in result.stdout and "weights: present" in result.stdout
    assert "3=Dress" in result.stdout
    report = json.loads(ok("info", "--json", env={"QSILK_DEMO_MODEL": str(demo_dir)}).stdout)
    demo = report["demo_model"]
    assert demo["present"] and demo["from_env"] and len(demo["classes"]) == 10
    from qsilk.models.demo import QSilkDemoPipeline

    pipe = QSilkDemoPipeline.from_pretrained(demo_dir)
    expected = sum(p.numel() for m in (pipe.transformer, pipe.vae) for p in m.state_dict().values())
    assert demo["parameters"] == expected
    assert report["device"]["cuda_available"] == torch.cuda.is_available()
    missing = ok("info", env={"QSILK_DEMO_MODEL": str(tmp_path / "none")})
    assert "not installed" in missing.stdout


# ---------------------------------------------------------------------------------------------- hardening (issue 7)


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_records_are_standard_json(demo_dir, tmp_path):
    """DPM-Solver's config holds lambda_min_clipped = -inf: the sidecar, the PNG text and compare.json must still
    parse under a strict parser (what browsers' JSON.parse accepts)."""
    gen(demo_dir, tmp_path / "g", "-c", "1", "--scheduler", "dpm")
    (png,) = pngs(tmp_path / "g")
    sidecar = _strict_json(png.with_suffix(".json").read_text())
    assert sidecar["params"]["scheduler_config"]["lambda_min_clipped"] == "-Infinity"
    with Image.open(png) as img:
        assert _strict_json(img.text["qsilk"])["params"] == sidecar["params"]
    ok("compare", "--model", demo_dir, "-c", "1", "--seed", "0", "--steps", "2", "--device", "cpu", "--scheduler",
       "dpm", "--out", tmp_path / "c")  # fmt: skip
    _strict_json((tmp_path / "c" / "compare.json").read_text())
    for sidecar_path in (tmp_path / "c" / "images").rglob("*.json"):
        _strict_json(sidecar_path.read_text())


def test_seed_ranges_parse_in_linear_time():
    import time

    from qsilk.cli.runs import parse_seeds

    start = time.perf_counter()
    seeds = parse_seeds(["0-99999", "5", "99999,100000"])
    elapsed = time.perf_counter() - start
    assert seeds == [*range(100_000), 100_000]  # in order, duplicates dropped
    assert elapsed < 5.0  # quadratic membership took ~100 s; linear takes ~10 ms (50x headroom for a busy CI)


def test_resume_detects_damaged_files_names_them_and_redoes_them(demo_dir, tmp_path):
    out = tmp_path / "cmp"
    args = ("compare", "--model", demo_dir, "-c", "1", "--seed", "0-2", "--steps", "2", "--device", "cpu", "--out", out)
    ok(*args)
    plain = sorted((out / "images" / "plain").glob("*.png"))
    maps = sorted((out / "images" / "qsilk").glob("*.maps.npz"))
    originals = {p: p.read_bytes() for p in [plain[0], maps[1]]}
    plain[0].write_bytes(originals[plain[0]][: len(originals[plain[0]]) // 2])  # truncated PNG, valid sidecar
    maps[1].write_bytes(b"")  # empty maps archive
    stale = out / "images" / "qsilk" / f".{maps[0].name}.4194305.tmp"  # a kill between write and rename
    stale.write_bytes(b"partial")
    result = ok(*args)
    assert f"redoing {plain[0]}: damaged PNG {plain[0].name}" in result.stderr
    assert f"redoing {maps[1].with_name(maps[1].name.replace('.maps.npz', '.png'))}: damaged maps {maps[1].name}" in result.stderr
    assert "removed 1 temp file(s) left by an interrupted run" in result.stderr
    assert "2 image(s) made" in result.stderr
    for path, data in originals.items():
        assert path.read_bytes() == data  # made again, byte-identical
    assert not stale.exists() and not list(out.rglob(".*.tmp"))


def test_progress_lines_without_a_terminal_and_one_summary_line_on_a_noop_rerun(demo_dir, tmp_path, monkeypatch):
    from qsilk.cli import runs

    monkeypatch.setattr(runs, "PROGRESS_INTERVAL_S", 0.0)  # every image gets its line
    result = gen(demo_dir, tmp_path / "o", "-c", "1", "--seed", "0-2")
    lines = result.stderr.splitlines()
    assert [line.split("]")[0] for line in lines[:3]] == ["[1/3", "[2/3", "[3/3"]
    assert re.fullmatch(r"3 image\(s\) made in [\d.]+ s \([\d.]+ s/image\)", lines[3])
    monkeypatch.setattr(runs, "PROGRESS_INTERVAL_S", 3600.0)  # a slow run: the first and the last image only
    result = gen(demo_dir, tmp_path / "p", "-c", "1", "--seed", "0-3")
    assert [line.split("]")[0] for line in result.stderr.splitlines()[:2]] == ["[1/4", "[4/4"]
    rerun = gen(demo_dir, tmp_path / "p", "-c", "1", "--seed", "0-3")
    assert rerun.stderr.splitlines() == [f"4 of 4 image(s) already done in {tmp_path / 'p'}; reusing them"]


def test_divergence_is_the_same_clean_line_with_and_without_qsilk_and_leaves_no_folder(demo_dir, tmp_path):
    messages = []
    for extra in ([], ["--no-qsilk"]):
        out = tmp_path / "deep" / "out"
        result = cli("generate", "--model", demo_dir, "-c", "1", "--steps", "2", "--device", "cpu", "--cfg", "1e30",
                     "--out", out, *extra)  # fmt: skip
        assert result.exit_code == 1, result.stderr
        assert result.stderr.splitlines()[-1] == (
            "error: the sampler diverged (NaN/Inf) for Trouser seed 0; try another --scheduler or a lower --cfg"
        )
        messages.append(result.stderr.splitlines()[-1])
        assert not (tmp_path / "deep").exists()  # the failed run removed the folders it created
    assert messages[0] == messages[1]


def test_checks_that_need_no_weights_come_before_the_model_load(demo_dir, tmp_path, monkeypatch):
    from qsilk.cli import models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before a cheap check")

    monkeypatch.setattr(models, "load_pipeline", no_load)
    (tmp_path / "file.txt").write_text("x")
    for args, message in (
        (["-c", "Spaceship"], "unknown class 'Spaceship'"),
        (["-c", "10"], "class id 10 is out of range 0..9"),
        (["--prompt", "a cat"], "is class-conditional: use --class"),
        (["-c", "1", "--scheduler", "PNDMScheduler"], "PNDMScheduler cannot run 2 step(s)"),
        (["-c", "1", "--out", tmp_path / "file.txt" / "sub"], "is not a folder"),
        (["-c", "1", "--out", "/proc/qsilk-test-out"], "is not writable"),
        (["-c", "1", "--preset", "nope"], "unknown preset 'nope'"),
    ):
        result = cli("generate", "--model", demo_dir, "--steps", "2", "--out", tmp_path / "o", *args)
        assert result.exit_code == 2 and message in result.stderr, (args, result.stderr)
        assert "model was loaded" not in result.stderr


def test_version_and_untruncated_help():
    assert ok("--version").stdout.strip() == f"qsilk {qsilk.__version__}"
    text = ok("--help").stdout
    commands = text[text.index("Commands:") :]
    assert "..." not in commands
    for command in ("generate", "compare", "info"):
        assert command in commands
    assert "--preset" in ok("generate", "--help").stdout and "--preset" in ok("compare", "--help").stdout


def test_preset_on_generate_and_compare(demo_dir, tmp_path):
    gen(demo_dir, tmp_path / "g", "-c", "1", "--preset", "strong", "--tile", "8")
    (png,) = pngs(tmp_path / "g")
    assert read_png_record(png)["params"]["qsilk"] == qsilk.QSilkConfig.preset("strong").replace(aqclip_tile=8).to_dict()
    out = tmp_path / "c"
    ok("compare", "--model", demo_dir, "-c", "1", "--seed", "0", "--steps", "2", "--device", "cpu", "--preset", "strong",
       "--config", '{"clamp_mode": "hard", "aqclip_k_max": 3.5}', "--out", out)  # fmt: skip
    summary = json.loads((out / "compare.json").read_text())
    labels = [c["label"] for c in summary["configs"]]
    assert labels == ["plain", "qsilk defaults", "strong", "clamp_mode=hard, aqclip_k_max=3.5"]
    assert summary["configs"][2]["config"] == qsilk.QSilkConfig.preset("strong").to_dict()
    assert [c["folder"] for c in summary["configs"]][2:] == ["strong", "clamp-mode-hard-aqclip-k-max-3-5"]
    html = (out / "index.html").read_text()
    assert "clamp_mode=hard, aqclip_k_max=3.5" in html and "config1" not in html


def test_compare_page_timing_warmup_scales_and_colour_bar(demo_dir, tmp_path, monkeypatch):
    from matplotlib import colormaps

    from qsilk.cli import runs

    calls = []
    real_sample = runs._sample

    def counting(pipe, kwargs, what):
        calls.append(what)
        return real_sample(pipe, kwargs, what)

    monkeypatch.setattr(runs, "_sample", counting)
    out = tmp_path / "c"
    ok("compare", "--model", demo_dir, "-c", "1", "-c", "2", "--seed", "0", "--steps", "2", "--device", "cpu",
       "--preset", "strong", "--out", out)  # fmt: skip
    assert len(calls) == 1 + 3 * 2 and calls[0].endswith("(warm-up)")  # one untimed call, then the timed images
    summary = json.loads((out / "compare.json").read_text())
    for c in summary["configs"]:
        assert c["seconds_per_image_median"] > 0 and c["timed_images"] == 2 and c["timed_in_this_run"]
        assert c["seconds_per_step_median"] == pytest.approx(c["seconds_per_image_median"] / 2)
    # Each compared config has its own difference scale: its largest |A - plain|, computed here independently.
    for c, vmax in zip(summary["configs"][1:], summary["diff_max"], strict=True):
        diffs = []
        for row in summary["images"]:
            a, b = pixels(out / row["files"][c["label"]]), pixels(out / row["files"]["plain"])
            diffs.append(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(-1).max())
        assert vmax == pytest.approx(max(diffs)) and c["max_diff_vs_plain"] == vmax
    html = (out / "index.html").read_text()
    assert "median" in html and "warm-up" in html and "own colour scale" in html
    # The grid carries a confidence colour scale below the tiles: both ends of viridis appear there.
    grid = pixels(out / "grid.png")
    legend = grid[-60:].reshape(-1, 3).astype(int)
    for end in (0.0, 1.0):
        colour = (np.asarray(colormaps["viridis"](end)[:3]) * 255).round().astype(int)
        assert np.abs(legend - colour).sum(-1).min() <= 12, end
    assert summary["measured"] is None  # the FID sentence belongs to the shipped weights, not this tiny model


def test_confidence_fallback_is_recorded_and_labelled(demo_dir, tmp_path, monkeypatch):
    from qsilk.cli.compare import confidence_used
    from qsilk.cli.runs import ImageResult, summarize_stats

    fallback = "structure (fallback: SDPA was bypassed)"
    sources = ["attention", fallback, fallback, fallback]
    stats = [{"step": i, "touched_fraction": 0.0, "confidence_source": s} for i, s in enumerate(sources)]
    summary = summarize_stats(stats)
    assert summary["confidence_sources"] == {"attention": 1, fallback: 3}
    assert [s["confidence_source"] for s in summary["per_step"]] == sources
    result = ImageResult(None, Path("x.png"), {"stats": summary}, np.zeros((1, 1, 3), np.uint8), False, 0.1)
    assert confidence_used([result], "attention") == (
        "attention -> structure (fallback on 75 % of steps: SDPA was bypassed)"
    )
    clean = ImageResult(None, Path("x.png"), {"stats": summarize_stats(stats[:1])}, result.image, False, 0.1)
    assert confidence_used([clean], "attention") == "attention"
    assert summarize_stats([{"step": 0}])["confidence_sources"] is None  # stats that do not say

    # End to end: an attention probe that never yields a map (as when a fast backend bypasses SDPA) -> the PNG
    # record counts the fallback steps and the compare labels say so.
    from qsilk.attention.probe import AttentionEntropyProbe

    monkeypatch.setattr(AttentionEntropyProbe, "confidence", lambda self, *a, **k: None)
    out = tmp_path / "fb"
    ok("compare", "--model", demo_dir, "-c", "1", "--seed", "0", "--steps", "2", "--device", "cpu",
       "--confidence", "attention", "--out", out)  # fmt: skip
    (png,) = sorted((out / "images" / "qsilk").glob("*.png"))
    counts = read_png_record(png)["stats"]["confidence_sources"]
    assert sum(counts.values()) == 2 and all(k.startswith("structure (fallback") for k in counts)
    label = json.loads((out / "compare.json").read_text())["configs"][1]["confidence_used"]
    assert label.startswith("attention -> structure (fallback on 100 % of steps")


def test_measured_fid_sentence_comes_from_the_shipped_results():
    from qsilk.cli.compare import DEMO_FID_RESULTS, measured_fid_sentence

    docs = Path(__file__).resolve().parents[1] / "docs" / "results" / "demo-fid.json"
    assert DEMO_FID_RESULTS.read_bytes() == docs.read_bytes()  # the packaged copy is the committed raw result
    results = json.loads(docs.read_text())
    cells = {r["qsilk"]: r for r in results.values() if (r["steps"], r["cfg"]) == (8, 7.0)}
    sentence = measured_fid_sentence()
    for tag in ("off", "default", "qsilk-strong"):
        assert f"{cells[tag]['fid']:.2f}" in sentence
    assert "8 steps, CFG 7" in sentence and "5,000 samples" in sentence


@pytest.mark.parametrize(
    "name",
    ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
     "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler",
     "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
     "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"],
)  # fmt: skip
def test_scheduler_step_check_passes_schedulers_that_run(name):
    """The dry run before sampling must not reject a scheduler that works (flow matching has no
    scale_model_input; dynamic shifting needs mu), and must reject PNDM with too few steps."""
    import diffusers

    from qsilk.cli.errors import CliError
    from qsilk.cli.models import check_scheduler_steps

    cls = getattr(diffusers, name)
    for config in ({}, {"use_dynamic_shifting": True} if name.startswith("FlowMatchEuler") else {}):
        for steps in (1, 4, 20):
            check_scheduler_steps(cls(**config), steps)
    with pytest.raises(CliError, match="PNDMScheduler cannot run 2 step"):
        check_scheduler_steps(diffusers.PNDMScheduler(), 2)
