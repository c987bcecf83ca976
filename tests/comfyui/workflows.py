"""The example workflows of comfyui_qsilk/workflows: built here in API format, converted to the UI (graph) format
with the real server's /object_info, which fixes each node's widget order.

    python tests/comfyui/workflows.py http://127.0.0.1:PORT   # rewrite comfyui_qsilk/workflows/*.json
    QSILK_UPDATE_WORKFLOWS=1 make test-comfyui                 # the same, from the server the tests start

The server test (test_server.py) checks the committed files against a live server and runs the SD1.5 one.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

WORKFLOWS_DIR = Path(__file__).resolve().parents[2] / "comfyui_qsilk" / "workflows"

QSILK_DEFAULTS = {
    "preset": "custom",
    "clamp": True,
    "clamp_quantile": 0.001,
    "clamp_mode": "soft",
    "clamp_per_channel": False,
    "clamp_softness": 0.25,
    "clamp_window_start": 0.0,
    "clamp_window_end": 1.0,
    "aqclip": True,
    "aqclip_tile": 16,
    "aqclip_stride": 8,
    "aqclip_k_min": 2.5,
    "aqclip_k_max": 4.5,
    "aqclip_softness": 0.25,
    "aqclip_window_start": 0.0,
    "aqclip_window_end": 1.0,
    "confidence": "structure",
    "ema": 0.0,
    "placement": "x0",
    "config_json": "",
}


def _qsilk(model_link: list, **changes) -> dict:
    return {"class_type": "QSilk", "inputs": {"model": model_link, **QSILK_DEFAULTS, **changes}}


def _tail(
    model: list, positive: list, negative: list, latent: list, vae: list, *, steps, cfg, sampler, scheduler
):
    """KSampler -> VAEDecode -> SaveImage, and QSilkPreview -> two SaveImage nodes (ids 20-25)."""
    return {
        "20": {
            "class_type": "KSampler",
            "inputs": {
                "model": model,
                "seed": 0,
                "steps": steps,
                "cfg": cfg,
                "sampler_name": sampler,
                "scheduler": scheduler,
                "positive": positive,
                "negative": negative,
                "latent_image": latent,
                "denoise": 1.0,
            },
        },
        "21": {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": vae}},
        "22": {"class_type": "SaveImage", "inputs": {"images": ["21", 0], "filename_prefix": "qsilk"}},
        "23": {
            "class_type": "QSilkPreview",
            "inputs": {"model": model, "samples": ["20", 0], "upscale": 8, "normalize": True},
        },
        "24": {
            "class_type": "SaveImage",
            "inputs": {"images": ["23", 0], "filename_prefix": "qsilk-confidence"},
        },
        "25": {"class_type": "SaveImage", "inputs": {"images": ["23", 1], "filename_prefix": "qsilk-change"}},
    }


def _text(clip: list, text: str) -> dict:
    return {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": clip}}


def sd15() -> dict:
    """SD1.5: attention-entropy confidence -> QSilk (confidence='attention') -> KSampler, CFG 7, 20 steps."""
    return {
        "1": {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"},
        },
        "2": {
            "class_type": "QSilkAttentionConfidence",
            "inputs": {"model": ["1", 0], "max_queries": 256, "max_heads": 4, "ema": 0.0},
        },
        "3": _qsilk(["2", 0], confidence="attention"),
        "4": _text(["1", 1], "a watercolor fox in a snowy forest, detailed"),
        "5": _text(["1", 1], "blurry, low quality"),
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 768, "batch_size": 1}},
        **_tail(
            ["3", 0],
            ["4", 0],
            ["5", 0],
            ["6", 0],
            ["1", 2],
            steps=20,
            cfg=7.0,
            sampler="euler",
            scheduler="normal",
        ),
    }


def sdxl() -> dict:
    """SDXL: RescaleCFG (the CFG-function slot) -> QSilk (a post-CFG function): both act. CFG 9, dpmpp_2m karras."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "2": {"class_type": "RescaleCFG", "inputs": {"model": ["1", 0], "multiplier": 0.7}},
        "3": _qsilk(["2", 0]),
        "4": _text(["1", 1], "a red fox on a mossy rock, golden hour, 35mm photo"),
        "5": _text(["1", 1], "oversaturated, blurry"),
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        **_tail(
            ["3", 0],
            ["4", 0],
            ["5", 0],
            ["6", 0],
            ["1", 2],
            steps=25,
            cfg=9.0,
            sampler="dpmpp_2m",
            scheduler="karras",
        ),
    }


def flux() -> dict:
    """Flux dev: guidance-distilled, sampled at CFG 1 (no unconditional branch); QSilk still acts on every x0."""
    return {
        "1": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"},
        },
        "7": {
            "class_type": "DualCLIPLoader",
            "inputs": {
                "clip_name1": "clip_l.safetensors",
                "clip_name2": "t5xxl_fp16.safetensors",
                "type": "flux",
                "device": "default",
            },
        },
        "8": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "3": _qsilk(["1", 0]),
        "4": _text(["7", 0], "a red fox on a mossy rock, golden hour, 35mm photo"),
        "9": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["4", 0], "guidance": 3.5}},
        "5": _text(["7", 0], ""),
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 768, "batch_size": 1}},
        **_tail(
            ["3", 0],
            ["9", 0],
            ["5", 0],
            ["6", 0],
            ["8", 0],
            steps=20,
            cfg=1.0,
            sampler="euler",
            scheduler="simple",
        ),
    }


API_WORKFLOWS = {"sd15": sd15, "sdxl": sdxl, "flux": flux}


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def api_to_ui(api: dict, object_info: dict) -> dict:
    """A UI-format (LiteGraph) workflow equivalent to an API-format one; widget order from /object_info."""
    ids = {key: n for n, key in enumerate(api, start=1)}
    links, nodes = [], []
    outgoing: dict[tuple[int, int], list[int]] = {}
    for key, node in api.items():
        info = object_info[node["class_type"]]
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
        inputs, widgets = [], []
        for name in order:
            value = node["inputs"].get(name)
            spec = specs[name]
            if isinstance(value, list):  # a link [source id, output slot]
                link_id = len(links) + 1
                source = ids[value[0]]
                kind = object_info[api[value[0]]["class_type"]]["output"][value[1]]
                links.append([link_id, source, value[1], ids[key], len(inputs), kind])
                outgoing.setdefault((source, value[1]), []).append(link_id)
                inputs.append(
                    {"name": name, "type": kind if not _is_widget(spec) else spec[0], "link": link_id}
                )
            elif _is_widget(spec):  # an omitted (optional) widget shows its default, as the frontend does
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                widgets.append(value if name in node["inputs"] else options.get("default"))
                if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("control_after_generate"):
                    widgets.append("fixed")
        nodes.append({"key": key, "info": info, "inputs": inputs, "widgets": widgets})
    ui_nodes = []
    for order, node in enumerate(nodes):
        node_id = ids[node["key"]]
        info = node["info"]
        outputs = [
            {"name": name, "type": kind, "links": outgoing.get((node_id, slot), []), "slot_index": slot}
            for slot, (name, kind) in enumerate(zip(info["output_name"], info["output"], strict=True))
        ]
        ui_nodes.append(
            {
                "id": node_id,
                "type": info["name"],
                "pos": [40 + 360 * (order % 4), 40 + 320 * (order // 4)],
                "size": [320, 120 + 26 * len(node["widgets"])],
                "flags": {},
                "order": order,
                "mode": 0,
                "inputs": node["inputs"],
                "outputs": outputs,
                "properties": {"Node name for S&R": info["name"]},
                "widgets_values": node["widgets"],
            }
        )
    return {
        "last_node_id": len(ui_nodes),
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }


def ui_workflows(object_info: dict) -> dict[str, dict]:
    return {name: api_to_ui(build(), object_info) for name, build in API_WORKFLOWS.items()}


def dump(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"


def main(url: str) -> None:
    with urllib.request.urlopen(f"{url}/object_info", timeout=60) as response:
        write_all(json.load(response))


def write_all(object_info: dict) -> None:
    WORKFLOWS_DIR.mkdir(parents=True, exist_ok=True)
    for name, build in API_WORKFLOWS.items():
        (WORKFLOWS_DIR / f"qsilk-{name}-api.json").write_text(dump(build()))
        (WORKFLOWS_DIR / f"qsilk-{name}.json").write_text(dump(api_to_ui(build(), object_info)))
        print(f"wrote qsilk-{name}-api.json and qsilk-{name}.json")


if __name__ == "__main__":
    main(sys.argv[1])
