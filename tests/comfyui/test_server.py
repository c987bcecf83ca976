"""The node pack through the real ComfyUI HTTP server: loaded from custom_nodes/, listed in /object_info, the
example SD1.5 API workflow run via POST /prompt to a PNG, out-of-range and malformed inputs rejected."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import workflows

REPO = Path(__file__).resolve().parents[2]
COMFYUI_DIR = Path(os.environ["QSILK_COMFYUI_DIR"])
CKPT_SCRIPT = COMFYUI_DIR.parent / "make_compact_ckpt.py"
NODES = ("QSilk", "QSilkAttentionConfidence", "QSilkPreview")


def request(url: str, data: dict | None = None, timeout: float = 60) -> tuple[int, dict | bytes]:
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            status, raw, kind = response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        status, raw, kind = err.code, err.read(), err.headers.get("Content-Type", "")
    return status, json.loads(raw) if "json" in kind else raw


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui-base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "comfyui_qsilk").symlink_to(REPO / "comfyui_qsilk", target_is_directory=True)
    checkpoints = base / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    subprocess.run(
        [sys.executable, str(CKPT_SCRIPT), str(COMFYUI_DIR), str(checkpoints / "tiny-sd15.ckpt")],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(COMFYUI_DIR)},
    )
    (base / "frontend").mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(base / "server.log", "w")  # noqa: SIM115 - closed at teardown
    process = subprocess.Popen(
        [
            sys.executable,
            "main.py",
            "--cpu",
            "--use-pytorch-cross-attention",
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
            "--front-end-root",
            str(base / "frontend"),
            "--base-directory",
            str(base),
            "--disable-api-nodes",
        ],
        cwd=COMFYUI_DIR,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"ComfyUI exited with {process.returncode}:\n{(base / 'server.log').read_text()[-4000:]}"
                )
            try:
                if request(f"{url}/system_stats", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not answer in 240 s:\n{(base / 'server.log').read_text()[-4000:]}")
            time.sleep(1)
        yield url, base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def object_info(server):
    url, _ = server
    status, info = request(f"{url}/object_info", timeout=120)
    assert status == 200
    return info


def test_pack_loads_and_nodes_are_listed(server, object_info):
    _, base = server
    assert all(node in object_info for node in NODES), (base / "server.log").read_text()[-3000:]
    qsilk = object_info["QSilk"]
    assert qsilk["python_module"].startswith("custom_nodes.comfyui_qsilk")
    quantile = qsilk["input"]["optional"][
        "clamp_quantile"
    ]  # option widgets are optional (default if omitted)
    assert quantile[0] == "FLOAT" and quantile[1]["max"] == 0.49 and quantile[1]["tooltip"]
    assert object_info["QSilkPreview"]["output"] == ["IMAGE", "IMAGE"]


def test_committed_workflows_match_the_server(object_info):
    if os.environ.get("QSILK_UPDATE_WORKFLOWS"):  # regenerate comfyui_qsilk/workflows from this server
        workflows.write_all(object_info)
    for name, build in workflows.API_WORKFLOWS.items():
        api_file = workflows.WORKFLOWS_DIR / f"qsilk-{name}-api.json"
        ui_file = workflows.WORKFLOWS_DIR / f"qsilk-{name}.json"
        assert json.loads(api_file.read_text()) == build(), (
            f"{api_file.name} is stale: run tests/comfyui/workflows.py"
        )
        committed, expected = json.loads(ui_file.read_text()), workflows.api_to_ui(build(), object_info)
        for ours, theirs in zip(committed["nodes"], expected["nodes"], strict=True):
            # options added to QSilkConfig later append widgets at the end: compare the common prefix
            n = min(len(ours["widgets_values"]), len(theirs["widgets_values"]))
            assert ours["widgets_values"][:n] == theirs["widgets_values"][:n], (ui_file.name, ours["type"])
            assert {**ours, "widgets_values": None, "size": None} == {
                **theirs,
                "widgets_values": None,
                "size": None,
            }
        assert committed["links"] == expected["links"], ui_file.name
        for node in build().values():  # every API input is one the server declares
            info = object_info[node["class_type"]]["input"]
            declared = {**info.get("required", {}), **info.get("optional", {})}
            assert set(node["inputs"]) <= set(declared), node["class_type"]


def small_sd15_workflow(**qsilk_changes) -> dict:
    workflow = workflows.sd15()
    workflow["1"]["inputs"]["ckpt_name"] = "tiny-sd15.ckpt"
    workflow["6"]["inputs"].update(width=64, height=96)
    workflow["20"]["inputs"].update(steps=3)
    workflow["3"]["inputs"].update(qsilk_changes)
    return workflow


def run_prompt(url: str, workflow: dict, timeout: float = 300) -> dict:
    status, answer = request(f"{url}/prompt", {"prompt": workflow})
    assert status == 200, answer
    prompt_id = answer["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, history = request(f"{url}/history/{prompt_id}")
        if (
            status == 200
            and prompt_id in history
            and history[prompt_id]["status"].get("completed") is not None
        ):
            return history[prompt_id]
        time.sleep(1)
    pytest.fail(f"prompt {prompt_id} did not finish in {timeout} s")


def test_example_workflow_runs_and_returns_an_image(server):
    url, base = server
    entry = run_prompt(url, small_sd15_workflow())
    assert entry["status"]["status_str"] == "success", (
        entry["status"],
        (base / "server.log").read_text()[-3000:],
    )
    outputs = entry["outputs"]
    for node, prefix in (("22", "qsilk"), ("24", "qsilk-confidence"), ("25", "qsilk-change")):
        image = outputs[node]["images"][0]
        assert image["filename"].startswith(prefix)
        query = f"filename={image['filename']}&subfolder={image['subfolder']}&type={image['type']}"
        status, png = request(f"{url}/view?{query}")
        assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
        if node == "24":  # the preview is the latent grid upscaled 8x
            assert png[16:24] == (64).to_bytes(4, "big") + (96).to_bytes(4, "big")


def test_out_of_range_input_is_rejected_with_a_clear_message(server):
    url, _ = server
    status, answer = request(f"{url}/prompt", {"prompt": small_sd15_workflow(clamp_quantile=0.9)})
    assert status == 400
    errors = answer["node_errors"]["3"]["errors"]
    assert errors[0]["type"] == "value_bigger_than_max"
    assert "0.9" in errors[0]["message"] and "0.49" in errors[0]["message"]
    assert errors[0]["details"] == "clamp_quantile"


def test_bad_config_json_is_rejected_before_running(server):
    url, _ = server
    status, answer = request(
        f"{url}/prompt", {"prompt": small_sd15_workflow(config_json='{"aqclip_k_min": -1}')}
    )
    assert status == 400
    details = " ".join(e["details"] for e in answer["node_errors"]["3"]["errors"])
    assert "aqclip_k_min" in details
