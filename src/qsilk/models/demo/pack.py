"""Pack a run's results into a few small files (moving a run between machines), and unpack them.

    python -m qsilk.models.demo.pack pack runs/demo OUTDIR      # -> OUTDIR/run.tar.part-*
    python -m qsilk.models.demo.pack unpack OUTDIR runs/demo

The DiT checkpoint is packed without its optimizer state (Adam moments restart after unpacking) and with the EMA
weights in fp16, to keep the pack small. Cached latents are not packed: re-create them with ``train_ae`` (it
finalises again when ``latents.safetensors`` is missing).
"""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

from safetensors.torch import load_file, save

from .checkpoint import latest_checkpoint

PART_BYTES = 15 * 1024 * 1024


def pack(run: Path, out: Path) -> None:
    run, out = Path(run), Path(out)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel in ("ae/final", "ae/metrics.json", "ae/log.jsonl", "dit/log.jsonl", "dit/model_config.json"):
            if (run / rel).exists():
                tar.add(run / rel, arcname=rel)
        ae_ckpt = latest_checkpoint(run / "ae")
        if ae_ckpt is not None:
            for name in ("model.safetensors", "state.json"):
                tar.add(ae_ckpt / name, arcname=f"ae/ckpt/{ae_ckpt.name}/{name}")
            tar.add(ae_ckpt.parent / "latest.json", arcname="ae/ckpt/latest.json")
        ckpt = latest_checkpoint(run / "dit")
        if ckpt is not None:
            base = f"dit/ckpt/{ckpt.name}"
            for name in ("model.safetensors", "state.json", "config.json"):
                tar.add(ckpt / name, arcname=f"{base}/{name}")
            ema = {k: v.half() for k, v in load_file(str(ckpt / "ema.safetensors")).items()}
            data = save(ema)
            info = tarfile.TarInfo(f"{base}/ema.safetensors")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            tar.add(ckpt.parent / "latest.json", arcname="dit/ckpt/latest.json")
    data = buf.getvalue()
    out.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(data), PART_BYTES):
        (out / f"run.tar.part-{i // PART_BYTES:02d}").write_bytes(data[i : i + PART_BYTES])
    print(f"packed {len(data) / 1e6:.1f} MB into {-(-len(data) // PART_BYTES)} parts under {out}")


def unpack(src: Path, run: Path) -> None:
    data = b"".join(p.read_bytes() for p in sorted(Path(src).glob("run.tar.part-*")))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(run, filter="data")
    print(f"unpacked {len(data) / 1e6:.1f} MB into {run}")


if __name__ == "__main__":
    verb, a, b = sys.argv[1:4]
    {"pack": pack, "unpack": unpack}[verb](Path(a), Path(b))
