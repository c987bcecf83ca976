"""Tests against the real ComfyUI fixture (shared/comfyui). They run only under `make test-comfyui`, which uses the
ComfyUI venv's python and sets QSILK_COMFYUI_DIR to the extracted ComfyUI tree; the main suite (no ComfyUI)
ignores this folder."""

import os
import sys
from pathlib import Path

COMFYUI_DIR = os.environ.get("QSILK_COMFYUI_DIR")

if not COMFYUI_DIR:
    collect_ignore_glob = ["test_*.py"]
else:
    REPO = Path(__file__).resolve().parents[2]
    for path in (str(REPO / "src"), str(REPO), str(Path(__file__).resolve().parent), COMFYUI_DIR):
        if path not in sys.path:
            sys.path.insert(0, path)
    import torch

    torch.set_num_threads(1)
    from comfy.cli_args import args

    args.cpu = True  # before `nodes` is imported: there is no CUDA here
    # torch's SDPA: ComfyUI's CPU default (sub-quadratic attention in Python chunks) is ~100x slower at 64x96
    args.use_pytorch_cross_attention = True
