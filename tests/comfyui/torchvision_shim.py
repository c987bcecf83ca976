"""Make the index's torchvision importable next to the CPU torch wheel (run once by `make comfyui-env`).

The torchvision wheel on the package index is a CUDA build; its compiled ops do not load against torch's CPU
wheel, and ``import torchvision`` then fails in ``_meta_registrations.py`` with "operator torchvision::nms does not
exist". ComfyUI imports torchvision unconditionally, so the two fake-kernel registrations are made conditional on
the ops being loaded (shared/comfyui/README.md). Idempotent.
"""

import importlib.util
import pathlib
import sys

spec = importlib.util.find_spec("torchvision")
if spec is None or spec.origin is None:
    sys.exit("torchvision_shim: torchvision is not installed in this interpreter")
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
text = path.read_text()
patched = text
for op in ("nms", "qnms"):
    original = f'@torch.library.register_fake("torchvision::{op}")'
    conditional = (
        f'@(torch.library.register_fake("torchvision::{op}") '
        "if torchvision.extension._has_ops() else (lambda fn: fn))"
    )
    if conditional not in patched:
        if original not in patched:
            sys.exit(f"torchvision_shim: {path} has no {original!r}; this torchvision needs a new shim")
        patched = patched.replace(original, conditional)
if patched != text:
    path.write_text(patched)
print(f"torchvision_shim: {path} {'patched' if patched != text else 'already patched'}")
