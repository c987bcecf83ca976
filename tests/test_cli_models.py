"""qsilk CLI with models other than the demo: a tiny Stable Diffusion folder (prompts), the same weights as an
original-layout single-file ``.safetensors`` (``from_single_file`` with a local ``config=`` folder), a DiT folder,
and hub ids passed through unchanged (loader monkeypatched: no network)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("typer")
pytest.importorskip("diffusers")

sys.path.insert(0, str(Path(__file__).parent))
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import qsilk  # noqa: E402
from qsilk.cli import app  # noqa: E402
from qsilk.cli.errors import CliError  # noqa: E402
from qsilk.cli.models import resolve_model  # noqa: E402
from qsilk.cli.runs import read_png_record  # noqa: E402
from tiny_pipelines import tiny_dit_pipeline, tiny_sd_pipeline  # noqa: E402

runner = CliRunner()


def cli(*args, env: dict | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def ok(*args, env: dict | None = None):
    result = cli(*args, env=env)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def only_png(folder: Path) -> Path:
    (png,) = sorted(folder.glob("*.png"))
    return png


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ---------------------------------------------------------------------------------------------- original SD layout


def _resnet_names(key: str) -> str:
    for ours, theirs in (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                         ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")):  # fmt: skip
        key = key.replace(f".{ours}.", f".{theirs}.")
    return key


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel -> original (LDM) key layout, the inverse of diffusers' converter, for any
    number of levels and layers per block."""
    step = unet.config.layers_per_block + 1
    up_attn = [hasattr(block, "attentions") for block in unet.up_blocks]
    simple = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
    out = {}
    for key, value in unet.state_dict().items():
        prefix = next((p for p in simple if key.startswith(p + ".")), None)
        block = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
        mid = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if prefix is not None:
            new = simple[prefix] + key[len(prefix) :]
        elif block:
            side, i, kind, j, tail = block.group(1), int(block.group(2)), block.group(3), int(block.group(4)), block.group(5)
            if kind == "downsamplers":
                new = f"input_blocks.{(i + 1) * step}.0.op.{tail.removeprefix('conv.')}"
            elif kind == "upsamplers":
                new = f"output_blocks.{i * step + step - 1}.{2 if up_attn[i] else 1}.{tail}"
            else:
                index = 1 + i * step + j if side == "down" else i * step + j
                new = f"{'input' if side == 'down' else 'output'}_blocks.{index}.{0 if kind == 'resnets' else 1}.{tail}"
            new = _resnet_names(new) if kind == "resnets" else new
        elif mid:
            kind, k, tail = mid.groups()
            new = f"middle_block.{1 if kind == 'attentions' else (0 if k == '0' else 2)}.{tail}"
            new = _resnet_names(new) if kind == "resnets" else new
        else:
            raise KeyError(key)
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    simple = DIFFUSERS_TO_LDM_MAPPING["vae"]
    levels = len(vae.config.down_block_types)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in vae.state_dict().items():
        block = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
        mid_res = re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key)
        mid_attn = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key)
        if key in simple:
            new = simple[key]
        elif block:
            part, side, i, kind, j, tail = block.groups()
            level = int(i) if side == "down" else levels - 1 - int(i)  # LDM numbers decoder levels bottom-up
            if kind == "resnets":
                new = f"{part}.{side}.{level}.block.{j}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                new = f"{part}.{side}.{level}.{'downsample' if side == 'down' else 'upsample'}.{tail}"
        elif mid_res:
            part, k, tail = mid_res.groups()
            new = f"{part}.mid.block_{int(k) + 1}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
        elif mid_attn:
            part, name, kind = mid_attn.groups()
            new = f"{part}.mid.attn_1.{attn[name]}.{kind}"
            if kind == "weight" and value.ndim == 2:
                value = value[:, :, None, None]  # LDM stores these as 1x1 convolutions
        else:
            raise KeyError(key)
        out["first_stage_model." + new] = value
    return out


def sd_to_single_file(pipe, path: Path) -> None:
    from safetensors.torch import save_file

    state = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    state.update({f"cond_stage_model.transformer.text_model.{k}": v for k, v in pipe.text_encoder.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-sd")
    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(root / "sd")
    sd_to_single_file(pipe, root / "sd.safetensors")
    return {"folder": root / "sd", "file": root / "sd.safetensors"}


def gen(*args):
    return ok("generate", "--steps", "2", "--device", "cpu", *args)


# ---------------------------------------------------------------------------------------------- text models


def test_text_model_from_folder_matches_direct_call(sd, tmp_path):
    gen("--model", sd["folder"], "--prompt", "a red cube", "--negative-prompt", "blurry", "--cfg", "5", "--seed",
        "4", "--width", "40", "--height", "32", "--quantile", "0.01", "--out", tmp_path)  # fmt: skip
    png = only_png(tmp_path)
    record = read_png_record(png)
    params = record["params"]
    assert params["prompt"] == "a red cube" and params["negative_prompt"] == "blurry"
    assert (params["width"], params["height"]) == (40, 32) and params["pipeline"] == "StableDiffusionPipeline"
    assert png.name.startswith("a-red-cube-seed4-")
    assert Image.open(png).size == (40, 32)
    assert record["stats"]["steps"] == 2

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(sd["folder"])
    pipe.set_progress_bar_config(disable=True)
    with qsilk.enable(pipe, qsilk.QSilkConfig(clamp_quantile=0.01)):
        image = pipe(prompt="a red cube", negative_prompt="blurry", num_inference_steps=2, guidance_scale=5.0,
                     generator=torch.Generator().manual_seed(4), width=40, height=32, output_type="np").images[0]  # fmt: skip
    np.testing.assert_array_equal(pixels(png), (np.clip(image, 0, 1) * 255).round().astype(np.uint8))


def test_text_model_input_checks(sd, tmp_path):
    for args, message in (
        (["--class", "3"], "is a text-to-image model: use --prompt, not --class"),
        ([], "give at least one --prompt"),
        (["--prompt", "x", "--width", "32"], "give both --width and --height"),
    ):
        result = cli("generate", "--model", sd["folder"], "--steps", "2", "--out", tmp_path / "o", *args)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "o").exists()


def test_text_model_compare(sd, tmp_path):
    ok("compare", "--model", sd["folder"], "--prompt", "a cat", "--prompt", "a dog", "--seed", "0", "--steps", "2",
       "--device", "cpu", "--cfg", "9", "--out", tmp_path)  # fmt: skip
    summary = json.loads((tmp_path / "compare.json").read_text())
    assert summary["rows"] == ["a cat / seed 0", "a dog / seed 0"] and summary["pipeline"] == "StableDiffusionPipeline"
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "index.html").is_file()


# ---------------------------------------------------------------------------------------------- single file


def test_single_file_checkpoint_with_local_config_equals_the_folder(sd, tmp_path):
    args = ["--prompt", "a blue ball", "--seed", "1", "--cfg", "6"]
    gen("--model", sd["folder"], *args, "--out", tmp_path / "folder")
    gen("--model", sd["file"], "--model-config", sd["folder"], *args, "--out", tmp_path / "file")
    from_folder, from_file = only_png(tmp_path / "folder"), only_png(tmp_path / "file")
    np.testing.assert_array_equal(pixels(from_file), pixels(from_folder))
    model = read_png_record(from_file)["params"]["model"]
    assert model["kind"] == "single_file" and model["location"] == str(sd["file"].resolve())
    assert read_png_record(from_file)["params"]["pipeline"] == "StableDiffusionPipeline"  # guessed from the keys
    # A pickled .ckpt ({"state_dict": ...}, the original release format) and an explicit pipeline class.
    from safetensors.torch import load_file

    ckpt = tmp_path / "sd.ckpt"
    torch.save({"state_dict": load_file(str(sd["file"]))}, ckpt)
    gen("--model", ckpt, "--model-config", sd["folder"], "--pipeline-class", "StableDiffusionPipeline", *args,
        "--out", tmp_path / "ckpt")  # fmt: skip
    np.testing.assert_array_equal(pixels(only_png(tmp_path / "ckpt")), pixels(from_folder))
    result = cli("generate", "--model", sd["file"], "--pipeline-class", "DiTPipeline", "--prompt", "x",
                 "--out", tmp_path / "o")  # fmt: skip
    assert result.exit_code == 2 and "pipeline class 'DiTPipeline' cannot load single-file checkpoints" in result.stderr


def test_single_file_without_config_says_how_to_load_offline(sd, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # from_single_file would fetch SD 1.5's configs from the hub
    result = cli("generate", "--model", sd["file"], "--prompt", "x", "--steps", "2", "--out", tmp_path / "o")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: cannot load model {sd['file']}: ")
    assert "pass --model-config <local diffusers folder" in result.stderr and result.stderr.count("\n") == 1
    result = cli("generate", "--model", sd["file"], "--model-config", tmp_path, "--prompt", "x", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "is not a diffusers pipeline folder" in result.stderr
    assert not (tmp_path / "o").exists()


def test_unrecognised_single_file_checkpoint(tmp_path):
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "odd.safetensors"))
    result = cli("generate", "--model", tmp_path / "odd.safetensors", "--prompt", "x", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "pass --pipeline-class" in result.stderr
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    result = cli("generate", "--model", tmp_path / "broken.safetensors", "--prompt", "x", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "cannot read checkpoint" in result.stderr


# ---------------------------------------------------------------------------------------------- DiT and hub ids


def test_dit_folder_takes_class_ids(tmp_path):
    tiny_dit_pipeline().save_pretrained(tmp_path / "dit")
    gen("--model", tmp_path / "dit", "--class", "3", "--class", "999", "--out", tmp_path / "o")
    records = [read_png_record(p)["params"] for p in sorted((tmp_path / "o").glob("*.png"))]
    assert sorted(r["class_id"] for r in records) == [3, 999] and records[0]["pipeline"] == "DiTPipeline"
    result = cli("generate", "--model", tmp_path / "dit", "--class", "1000", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "class id 1000 is out of range 0..999" in result.stderr


def test_hub_id_is_passed_through_unchanged(tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    calls = []

    def fake_from_pretrained(name, **kwargs):
        calls.append((name, kwargs))
        return tiny_sd_pipeline()

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", fake_from_pretrained)
    gen("--model", "someone/some-model.v2", "--prompt", "a cat", "--out", tmp_path)
    assert calls == [("someone/some-model.v2", {"dtype": torch.float32})]
    model = read_png_record(only_png(tmp_path))["params"]["model"]
    assert model == {"spec": "someone/some-model.v2", "kind": "hub", "location": "someone/some-model.v2"}


def test_hub_failure_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = cli("generate", "--model", "nobody/no-such-model-qsilk", "--prompt", "x", "--out", tmp_path / "o")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: cannot load model nobody/no-such-model-qsilk: ")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("spec", "kind"),
    [("owner/name", "hub"), ("Org-1/model_v1.5", "hub"), ("./missing", None), ("missing", None),
     ("a/b/c", None), ("owner/name.safetensors", None), ("~/nothing/here", None), ("/abs/missing", None)],
)  # fmt: skip
def test_resolve_model_classifies_without_loading(spec, kind):
    if kind is None:
        with pytest.raises(CliError, match="does not exist"):
            resolve_model(spec)
    else:
        assert resolve_model(spec).kind == kind


# ---------------------------------------------------------------------------------------------- hardening (issue 7)


def test_legacy_ckpt_key_guessing_is_a_clear_message(sd, tmp_path):
    from safetensors.torch import load_file

    ckpt = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": load_file(str(sd["file"]))}, ckpt, _use_new_zipfile_serialization=False)
    result = cli("generate", "--model", ckpt, "--prompt", "x", "--steps", "2", "--out", tmp_path / "o")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "legacy (non-zip) format" in result.stderr and "pass --pipeline-class" in result.stderr
    assert "mmap" not in result.stderr
    assert not (tmp_path / "o").exists()


def _console_script(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real entry point in a fresh process: library loggers write to the real stderr, as for a user."""
    return subprocess.run(
        [sys.executable, "-m", "qsilk.cli", *map(str, args)],
        capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_offline_hub_id_is_one_error_line_without_library_noise(tmp_path):
    proc = _console_script("generate", "--model", "nobody/no-such-model-qsilk", "--prompt", "x",
                           "--out", tmp_path / "o", env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot load model nobody/no-such-model-qsilk: ")
    assert "not in the local Hugging Face cache" in lines[0] and "stacktrace" not in lines[0]
    assert not (tmp_path / "o").exists()


def test_fp16_on_cpu_says_the_truth_once(tmp_path):
    tiny_dit_pipeline().save_pretrained(tmp_path / "dit")
    proc = _console_script("generate", "--model", tmp_path / "dit", "--class", "3", "--steps", "2", "--device", "cpu",
                           "--dtype", "fp16", "--out", tmp_path / "o")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    fp16 = [line for line in lines if "fp16" in line or "float16" in line]
    assert len(fp16) == 1 and fp16[0].startswith("warning: fp16 on CPU: it runs"), proc.stderr
    assert read_png_record(only_png(tmp_path / "o"))["params"]["dtype"] == "fp16"
