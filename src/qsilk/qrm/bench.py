"""Per-step cost of QRM, measured side by side: one transformer call (CFG batch) without and with a QRM attached.

    python -m qsilk.qrm.bench --model demo --repeats 30
    python -m qsilk.qrm.bench --model dit-xl --repeats 5     # DiT-XL/2 256 px config, random weights (2.7 GB)

Calls alternate (plain, light, faithful, plain, ...) so machine load affects all alike; medians are reported.
Prints parameters (absolute and % of the backbone) and overhead (% of a plain denoiser step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from .config import QRMConfig
from .hooks import attach
from .module import QRM

DIT_XL = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    sample_size=32,
    patch_size=2,
    num_embeds_ada_norm=1000,
)


def build(model: str):
    if model == "demo":
        from qsilk.models.demo import load_demo_pipeline

        transformer = load_demo_pipeline().transformer
        null = int(transformer.config.num_embeds_ada_norm)
    elif model == "dit-xl":
        from diffusers import DiTTransformer2DModel

        torch.manual_seed(0)
        transformer = DiTTransformer2DModel(**DIT_XL).eval()
        null = 1000
    else:
        raise ValueError(f"unknown model {model!r}: demo or dit-xl")
    return transformer.eval().requires_grad_(False), null


def bench(model: str, repeats: int, batch: int = 1, kinds=("light", "faithful")) -> dict:
    transformer, null = build(model)
    size = transformer.config.sample_size
    x = torch.randn(2 * batch, transformer.config.in_channels, size, size)
    labels = torch.tensor([1] * batch + [null] * batch)
    t = torch.full((2 * batch,), 500)
    qrms = {}
    for kind in kinds:
        qrm = QRM(QRMConfig.for_transformer(transformer, kind)).eval()
        with torch.no_grad():  # non-zero output so every add really happens
            for p in qrm.parameters():
                p.add_(0.01 * torch.randn_like(p))
        qrms[kind] = qrm
    times: dict[str, list[float]] = {"plain": [], **{k: [] for k in kinds}}
    # CPU seconds of this process beside wall seconds: on a shared machine other jobs stretch wall time by tens of
    # per cent from call to call, while the process's own CPU time moves far less.
    cpu: dict[str, list[float]] = {k: [] for k in times}

    def call(name: str) -> None:
        start, start_cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            transformer(x, timestep=t, class_labels=labels)
        times[name].append(time.perf_counter() - start)
        cpu[name].append(time.process_time() - start_cpu)

    call("plain")  # warm-up, not counted
    times["plain"].clear()
    cpu["plain"].clear()
    # The order rotates every round, so "first call after a detach" and slow drift do not land on one arm.
    arms = ["plain", *qrms]
    for r in range(repeats):
        for name in arms[r % len(arms) :] + arms[: r % len(arms)]:
            if name == "plain":
                call(name)
                continue
            with attach(transformer, qrms[name]):  # detached on leaving, also on error
                call(name)
    backbone = sum(p.numel() for p in transformer.parameters())
    plain = statistics.median(times["plain"])
    result = {
        "model": model,
        "backbone_params": backbone,
        "cfg_batch": 2 * batch,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "plain_step_ms": plain * 1e3,
        "plain_step_ms_min": min(times["plain"]) * 1e3,
        "plain_step_cpu_ms": statistics.median(cpu["plain"]) * 1e3,
    }
    # QRM's own work, timed alone: the pre-hook that computes every head's baseline and runs the module (what the
    # forward hooks then add is one torch.where per head). Milliseconds against a step of seconds, so on a busy CPU
    # this resolves a 1 % overhead where the difference of two whole-step timings cannot. The model's own head
    # linears (and DiT's embedders) then return those results instead of recomputing them: "saved" times that
    # recomputation alone, and work - saved is what QRM adds to the step.
    hook_ms, saved_ms = {}, {}
    for kind, qrm in qrms.items():
        call_kwargs = {"hidden_states": x, "timestep": t, "class_labels": labels}
        samples, saved = [], []
        with attach(transformer, qrm) as handle, torch.no_grad():
            for _ in range(max(repeats, 5) + 1):
                start = time.perf_counter()
                handle._on_call(transformer, (), call_kwargs)
                samples.append(time.perf_counter() - start)
                start = time.perf_counter()
                for module, _ in handle._swapped:
                    args, kwargs, _ = handle._reuse[id(module)]
                    type(module).forward(module, *args, **kwargs)
                saved.append(time.perf_counter() - start)
        hook_ms[kind] = statistics.median(samples[1:]) * 1e3
        saved_ms[kind] = statistics.median(saved[1:]) * 1e3
    for kind, qrm in qrms.items():
        med = statistics.median(times[kind])
        params = qrm.num_parameters()
        result[kind] = {
            "params": params,
            "params_percent": 100 * params / backbone,
            "step_ms": med * 1e3,
            "overhead_ms": (med - plain) * 1e3,
            "overhead_percent": 100 * (med - plain) / plain,
            # minima: the least disturbed call of each (a busy shared CPU inflates medians unevenly)
            "step_ms_min": min(times[kind]) * 1e3,
            "overhead_percent_min": 100 * (min(times[kind]) - min(times["plain"])) / min(times["plain"]),
            "step_cpu_ms": statistics.median(cpu[kind]) * 1e3,
            "overhead_percent_cpu": 100 * (statistics.median(cpu[kind]) / statistics.median(cpu["plain"]) - 1),
            "qrm_work_ms": hook_ms[kind],
            "qrm_work_percent": 100 * hook_ms[kind] / (plain * 1e3),
            "qrm_saved_ms": saved_ms[kind],
            "qrm_net_ms": hook_ms[kind] - saved_ms[kind],
            "qrm_net_percent": 100 * (hook_ms[kind] - saved_ms[kind]) / (plain * 1e3),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qsilk.qrm.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo", choices=["demo", "dit-xl"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kinds", nargs="+", default=["light", "faithful"])
    parser.add_argument("--batch", type=int, default=1, help="images per call (the CFG batch is twice this)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    text = json.dumps(bench(args.model, args.repeats, batch=args.batch, kinds=args.kinds), indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
