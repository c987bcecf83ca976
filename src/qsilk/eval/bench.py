"""Speed of QSilk's operators against the reference formulas, and QSilk's cost per denoiser step.

    python -m qsilk.eval.bench            # or: make bench
    python -m qsilk.eval.bench --quick    # skip the SD 1.5 UNet step (a few seconds)
    python -m qsilk.eval.bench --threads 1 --json docs/results/bench.json   # the README's table, raw numbers

Everything is measured side by side in one run on this machine; the printed ratios are what the README quotes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from qsilk import QSilk, QSilkConfig, aqclip, micro_clamp
from qsilk.eval.reference import reference_aqclip, reference_micro_clamp
from qsilk.files import atomic_write_text

SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (1, 4, 64, 64),
    (1, 4, 128, 128),
    (4, 4, 128, 128),
    (1, 16, 128, 128),
    # many small latents: per-call overheads dominate (QSilk computes the whole batch at once)
    (16, 4, 16, 16),
    (64, 4, 16, 16),
    (100, 1, 32, 32),
)


def median_time(
    fn: Callable[[], object], repeats: int, device: torch.device, min_seconds: float = 0.2
) -> float:
    """Best (minimum) per-call wall time of ``fn`` over ``repeats`` rounds, each round averaging enough calls for
    ``min_seconds``. The minimum, as timeit recommends: on a shared machine other processes only ever add time, so
    it is the estimate least distorted by load (the name is kept for callers)."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up
    sync()
    inner = 1
    if min_seconds > 0:
        started = time.perf_counter()
        fn()
        sync()
        once = max(time.perf_counter() - started, 1e-6)
        inner = max(1, int(min_seconds / repeats / once))
    rounds = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        rounds.append((time.perf_counter() - started) / inner)
    return min(rounds)


def bench_ops(
    device: torch.device,
    repeats: int = 5,
    shapes: tuple[tuple[int, int, int, int], ...] = SHAPES,
    min_seconds: float = 0.2,
) -> list[dict]:
    rows = []
    for shape in shapes:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device)
        x.view(-1)[::997] *= 8.0  # a few spikes
        exact = torch.equal(micro_clamp(x, mode="hard"), reference_micro_clamp(x))
        t_ref_clamp = median_time(lambda x=x: reference_micro_clamp(x), repeats, device, min_seconds)
        t_clamp = median_time(lambda x=x: micro_clamp(x), repeats, device, min_seconds)
        t_ref_aq = median_time(lambda x=x: reference_aqclip(x, 16, 8), repeats, device, min_seconds)
        t_aq = median_time(lambda x=x: aqclip(x, tile=16, stride=8), repeats, device, min_seconds)
        stab = QSilk(QSilkConfig())
        t_qsilk = median_time(lambda x=x, stab=stab: stab(x), repeats, device, min_seconds)
        rows.append(
            {
                "shape": "x".join(map(str, shape)),
                "clamp_ms": 1e3 * t_clamp,
                "ref_clamp_ms": 1e3 * t_ref_clamp,
                "clamp_speedup": t_ref_clamp / t_clamp,
                "clamp_exact": exact,
                "aqclip_ms": 1e3 * t_aq,
                "ref_aqclip_ms": 1e3 * t_ref_aq,
                "aqclip_speedup": t_ref_aq / t_aq,
                "qsilk_ms": 1e3 * t_qsilk,
            }
        )
    return rows


@torch.no_grad()
def bench_unet_step(device: torch.device, repeats: int = 3) -> dict:
    """QSilk (defaults) on the guided x0 vs one SD 1.5 UNet forward (512 px, CFG batch 2, random weights)."""
    from diffusers import UNet2DConditionModel

    from qsilk.attention.bench import sd15_unet_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sd15_unet_config()).to(device).eval()
    latents = torch.randn(2, 4, 64, 64, device=device)
    text = torch.randn(2, 77, 768, device=device)
    t = torch.tensor([500, 500], device=device)
    t_unet = median_time(
        lambda: unet(latents, t, encoder_hidden_states=text), repeats, device, min_seconds=0.0
    )
    stab = QSilk(QSilkConfig())
    x0 = latents[:1]  # the sampler sees the guided prediction of the one image being generated
    t_qsilk = median_time(lambda: stab(x0), 9, device)
    return {"unet_step_s": t_unet, "qsilk_ms": 1e3 * t_qsilk, "qsilk_fraction": t_qsilk / t_unet}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--quick", action="store_true", help="skip the SD 1.5 UNet step")
    parser.add_argument("--probe", action="store_true", help="also measure the attention-entropy probe")
    parser.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    console.print(
        f"qsilk bench on {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}"
    )
    rows = bench_ops(device)
    table = Table(title="operators vs the reference formulas (per call, best round)")
    for col in (
        "latent",
        "micro-clamp",
        "ref clamp",
        "speed-up",
        "exact",
        "AQClip",
        "ref AQClip",
        "speed-up",
        "QSilk",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["shape"],
            f"{r['clamp_ms']:.3f} ms",
            f"{r['ref_clamp_ms']:.3f} ms",
            f"{r['clamp_speedup']:.1f}x",
            "yes" if r["clamp_exact"] else "NO",
            f"{r['aqclip_ms']:.3f} ms",
            f"{r['ref_aqclip_ms']:.3f} ms",
            f"{r['aqclip_speedup']:.1f}x",
            f"{r['qsilk_ms']:.3f} ms",
        )
    console.print(table)
    result: dict = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "timing": "per-call time: the minimum over rounds of the mean time per call in each round",
        "load_average_before": _load_average(),
        "ops": rows,
    }
    if not args.quick:
        with console.status("timing one SD 1.5 UNet step (512 px, batch 2) ..."):
            step = bench_unet_step(device)
        result["unet"] = step
        console.print(
            f"SD 1.5 UNet step {step['unet_step_s']:.3f} s; QSilk {step['qsilk_ms']:.2f} ms = "
            f"[bold]{100 * step['qsilk_fraction']:.3f} %[/bold] of a step (target <= 0.5 %)"
        )
    if args.probe:
        from qsilk.attention.bench import bench_probe

        with console.status("timing the attention probe on the SD 1.5 UNet ..."):
            probe = bench_probe()
        result["probe"] = probe
        console.print(f"attention probe: {json.dumps(probe)}")
    result["load_average_after"] = _load_average()
    if args.json:
        write_json(result, args.json, sys.argv[1:] if argv is None else list(argv))
        console.print(f"raw results written to {args.json}")


def _load_average() -> list[float] | None:
    """1/5/15-minute load averages (how busy the machine was: the timings are only as good as that)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _git_commit() -> str | None:
    """The checkout's commit (with "+dirty" for uncommitted changes), or None outside a git checkout."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", str(here.parents[1])],
            cwd=here, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def write_json(result: dict, path: str, argv: list[str]) -> None:
    """Atomically write the raw results (plus how they were measured) as standard JSON."""
    target = Path(path)
    record = {
        "command": " ".join(["python -m qsilk.eval.bench", *argv]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
        "qsilk_commit": _git_commit(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        **result,
    }
    atomic_write_text(target, json.dumps(record, indent=2, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
