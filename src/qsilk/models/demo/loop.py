"""Small helpers shared by the training scripts: SIGTERM-safe stop flag, progress lines, LR schedule."""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path


class StopFlag:
    """Set by SIGTERM / SIGINT; the training loop checkpoints and exits at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        print(f"signal {signum}: will checkpoint and stop after this step", flush=True)
        self.requested = True


class Progress:
    """tqdm bar on a terminal; in a log file (nohup) one line every ``every`` steps instead."""

    def __init__(self, start: int, total: int, every: int, desc: str) -> None:
        self.every = every
        self.bar = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)
        self.desc = desc
        self.t0 = time.time()
        self.start = start

    def update(self, step: int, metrics: dict) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if metrics:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()})
        elif step % self.every == 0:
            rate = (step - self.start) / max(time.time() - self.t0, 1e-9)
            text = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            print(f"[{self.desc}] step {step} {text} ({rate:.3f} steps/s)", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def warmup_cosine(step: int, warmup: int, total: int | None, floor: float = 0.1) -> float:
    """LR multiplier: linear warmup, then cosine down to ``floor`` at ``total`` (constant if total is None)."""
    if step < warmup:
        return (step + 1) / warmup
    if total is None or total <= warmup:
        return 1.0
    progress = min((step - warmup) / (total - warmup), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
