"""Tests of the node pack in real ComfyUI (a package, so its conftest never shadows tests/conftest.py)."""
