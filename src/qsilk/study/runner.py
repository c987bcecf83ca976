"""Run a study: generate every cell's paired samples chunk by chunk, store per-sample features, bootstrap, report.

Folder layout (``out``)::

    spec.json                         the spec (its fixed part must match on resume)
    reference/chunk-*.safetensors     reference images' features, per metric
    cells/<cell>/chunk-*.safetensors  uint8 images + per-sample features of samples [start, start + count)
    cells/<cell>/bootstrap-n<n>-<metric>.safetensors  the metric's scores on each bootstrap replicate (n samples)
    results.json, results.csv         every number (deterministic: byte-identical on resume and across processes)
    timings.json                      seconds per image per cell (machine-dependent, kept apart)
    report/index.html                 plots, tables, image grid

Features are computed from the stored uint8 images (what a saved PNG holds), so a metric added to the spec later is
computed from the stored images of finished cells and gives the same numbers it would have given at once.

Every file is written to a temporary name and renamed, so a killed run leaves only whole files, and a rerun does
exactly the missing ones. Under ``accelerate launch`` each process takes every k-th work unit (reference chunk,
cell chunk, cell bootstrap); process 0 writes the results after a barrier. Numbers do not depend on the number
of processes: units are fixed index ranges computed alone, with a fixed thread count.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qsilk.files import atomic_save_tensors, atomic_write_text

from .bootstrap import bootstrap_indices, replicate_scorer, replicate_table
from .grid import Cell, StudySpec
from .methods import BASELINE, get_method

REFERENCE_CHUNK = 250


# -- small helpers ------------------------------------------------------------------------------------------------------


def chunk_name(start: int, count: int) -> str:
    return f"chunk-{start:07d}-{count:05d}.safetensors"


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> uint8, one channel when all channels are equal (grey)."""
    u8 = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    if u8.shape[1] > 1 and bool((u8 == u8[:, :1]).all()):
        u8 = u8[:, :1]
    return u8


class Progress:
    """A tqdm bar on a terminal; plain lines (one per unit) when stderr is not a TTY (logs, CI)."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.total, self.desc, self.done, self.enabled = total, desc, 0, enabled and total > 0
        self.started = time.time()
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="unit", dynamic_ncols=True)

    def update(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
            return
        elapsed = time.time() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        print(f"{self.desc}: {self.done}/{self.total} {label} ({elapsed:.0f}s, eta {eta:.0f}s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def load_metrics(names: Iterable[str]) -> dict[str, Any]:
    """Metric objects by name (``qsilk.eval.metrics.METRICS``) or import path ``module:attr`` (a class or a
    zero-argument factory); each has ``features(images)`` and ``score(features, reference)``."""
    import importlib

    out: dict[str, Any] = {}
    builtin = [n for n in names if ":" not in n]
    if builtin:
        from qsilk.eval.metrics import make_metrics

        out.update(make_metrics(builtin))
    for name in names:
        if ":" in name:
            module, _, attr = name.partition(":")
            try:
                factory = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as err:
                raise ValueError(f"cannot import metric {name!r}: {err}") from None
            out[name] = factory()
    return {n: out[n] for n in names}


def metric_key(name: str) -> str:
    """A metric name as a safetensors key part (import paths contain ':' and '.')."""
    return name.replace(":", "/")


def code_version() -> dict[str, Any]:
    """The qsilk code that made a chunk: package version, and the git commit (+ whether src/ had uncommitted
    edits) when running from a checkout. Kept in chunk metadata and provenance.json, not in results.json."""
    import subprocess

    import qsilk

    info: dict[str, Any] = {"qsilk": getattr(qsilk, "__version__", "unknown")}
    root = Path(__file__).resolve().parents[3]
    if (root / ".git").exists():
        try:
            run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=30).stdout  # noqa: E731
            info["git"] = run("rev-parse", "HEAD").strip()
            info["dirty"] = bool(run("status", "--porcelain", "--untracked-files=no", "--", "src").strip())
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def _dist_state():
    """accelerate's process state when launched by ``accelerate launch --multi_gpu`` (or torchrun), else None.

    Without CUDA, PartialState must be told ``cpu=True`` to join the process group (gloo): otherwise every process
    believes it is alone and all of them do every unit. (``accelerate launch --cpu`` starts a single process.)"""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes != int(os.environ["WORLD_SIZE"]):
        raise ValueError(
            f"launched as {os.environ['WORLD_SIZE']} processes, but accelerate sees {state.num_processes}: "
            "use `accelerate launch --multi_gpu --num_processes N` (also on CPU) or torchrun"
        )
    return state


# -- the study ------------------------------------------------------------------------------------------------------------


class Study:
    """One study folder. ``run()`` does every missing unit of this process, then (process 0) the results."""

    def __init__(
        self,
        spec: StudySpec,
        out: str | Path,
        *,
        pipe=None,
        metrics: dict[str, Any] | None = None,
        reference_images: Callable[[int, int], torch.Tensor] | None = None,
        progress: bool = True,
    ) -> None:
        self.spec = spec
        self.out = Path(out)
        self._pipe = pipe
        self._metrics = metrics
        self._reference_images = reference_images
        self.progress = progress
        self.state = _dist_state()
        self.rank = self.state.process_index if self.state else 0
        self.world = self.state.num_processes if self.state else 1
        self._base_scheduler_config = None
        self.code = json.dumps(code_version(), sort_keys=True)

    # -- lazily built pieces -------------------------------------------------------------------------------------------

    @property
    def metrics(self) -> dict[str, Any]:
        if self._metrics is None:
            self._metrics = load_metrics(self.spec.metrics)
        return self._metrics

    @property
    def pipe(self):
        if self._pipe is None:
            from qsilk.models.demo import load_demo_pipeline

            self._pipe = load_demo_pipeline(path=self.spec.model)
        self._pipe.set_progress_bar_config(disable=True)
        if self._base_scheduler_config is None:
            self._base_scheduler_config = dict(self._pipe.scheduler.config)
        return self._pipe

    def reference_images(self, start: int, count: int) -> torch.Tensor:
        if self._reference_images is None:
            from qsilk.eval.demo_fid import dataset_images

            self._reference_images = dataset_images(self.spec.ref_split)
        images = self._reference_images(start, count)
        # The demo pipeline returns grey as RGB (equal channels): give the reference the same layout.
        return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images

    def scheduler_for(self, name: str):
        """A fresh scheduler of the named kind from the model's own scheduler config."""
        import diffusers

        from qsilk.models.demo import SCHEDULER_NAMES

        self.pipe  # noqa: B018 - loads the model and its scheduler config
        cls = getattr(diffusers, SCHEDULER_NAMES.get(name.lower(), name), None)
        if not (isinstance(cls, type) and cls.__name__.endswith("Scheduler")):
            raise ValueError(f"unknown scheduler {name!r}; short names: {', '.join(SCHEDULER_NAMES)}")
        return cls.from_config({k: v for k, v in self._base_scheduler_config.items() if not k.startswith("_")})

    # -- folder ----------------------------------------------------------------------------------------------------------------

    def _check_folder(self) -> None:
        """Write spec.json (process 0), or check the stored one's fixed part and add new blocks to it; then every
        process continues with the stored spec, so all see the same cells."""
        for name in self.spec.metrics:  # unknown metrics fail before any work
            if ":" not in name and self._metrics is None:
                from qsilk.eval.metrics import METRICS

                if name not in METRICS:
                    raise ValueError(f"unknown metric {name!r}; choose from {sorted(METRICS)} or module:attr")
        spec_path = self.out / "spec.json"
        if spec_path.exists():
            stored = StudySpec.from_json(spec_path)
            fixed, given = stored.fixed(), self.spec.fixed()
            if fixed != given:
                diff = {k: (fixed[k], given[k]) for k in fixed if fixed[k] != given[k]}
                raise ValueError(
                    f"{self.out} holds a study with different fixed settings {diff} (stored, given): "
                    "use another --out folder, or the stored values"
                )
            new_blocks = [b for b in self.spec.blocks if b not in stored.blocks]
            new_metrics = [m for m in self.spec.metrics if m not in stored.metrics]
            if (new_blocks or new_metrics or stored.n != self.spec.n) and self.rank == 0:
                stored.blocks = [*stored.blocks, *new_blocks]
                stored.metrics = (*stored.metrics, *new_metrics)  # metrics may be added, never dropped
                stored.n = self.spec.n  # n may grow (or shrink: then only the first n samples are scored)
                atomic_write_text(spec_path, stored.to_json() + "\n")
        elif self.rank == 0:
            atomic_write_text(spec_path, self.spec.to_json() + "\n")
        self._barrier()
        stored = StudySpec.from_json(spec_path)
        self.spec.blocks, self.spec.metrics = stored.blocks, stored.metrics
        if self._metrics is not None and set(self._metrics) != set(self.spec.metrics):
            raise ValueError(f"metric objects given for {sorted(self._metrics)}, the study has {list(self.spec.metrics)}")

    def cell_dir(self, cell: Cell) -> Path:
        return self.out / "cells" / cell.key

    # -- work units ------------------------------------------------------------------------------------------------------------

    def units(self) -> list[tuple[str, Any, int, int]]:
        """All work units in a fixed order: ("ref", None, start, count) and ("cell", cell, start, count)."""
        out: list[tuple[str, Any, int, int]] = []
        for start in range(0, self.spec.ref_n, REFERENCE_CHUNK):
            out.append(("ref", None, start, min(REFERENCE_CHUNK, self.spec.ref_n - start)))
        for cell in self.spec.cells():
            for start, count in self.spec.chunks():
                out.append(("cell", cell, start, count))
        return out

    def unit_path(self, unit) -> Path:
        kind, cell, start, count = unit
        folder = self.out / "reference" if kind == "ref" else self.cell_dir(cell)
        return folder / chunk_name(start, count)

    def _missing_metrics(self, path: Path) -> list[str]:
        """Metrics whose features a chunk file lacks (all of them when the file does not exist)."""
        if not path.exists():
            return list(self.spec.metrics)
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
        return [n for n in self.spec.metrics if f"f.{metric_key(n)}" not in keys]

    def run(self, finalize: bool = True) -> bool:
        """Do this process's missing units, then (``finalize``) the bootstrap. True on the process that should write
        the results (process 0, after everyone has finished): ``qsilk.study.report.write_outputs``."""
        torch.set_num_threads(self.spec.threads)
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()  # the guiders' "experimental" banner, once per guider
        for block in self.spec.blocks:
            for scheduler in block.schedulers:
                self.scheduler_for(scheduler)
        self._check_folder()
        units = self.units()
        mine = [(u, self._missing_metrics(self.unit_path(u))) for k, u in enumerate(units) if k % self.world == self.rank]
        mine = [(u, missing) for u, missing in mine if missing]
        bar = Progress(len(mine), f"study[{self.rank}]" if self.world > 1 else "study", self.progress)
        try:
            for unit, missing in [m for m in mine if m[0][0] == "ref"]:
                self._reference_unit(unit, missing)
                bar.update(f"reference {unit[2]}")
            for unit, missing in [m for m in mine if m[0][0] == "cell" and self.unit_path(m[0]).exists()]:
                self._add_features(unit, missing)  # a metric added to a finished cell: from its stored images
                bar.update(f"{unit[1].key} {unit[2]} +{','.join(missing)}")
            cell_units = [u for u, _ in mine if u[0] == "cell" and not self.unit_path(u).exists()]
            for cell in dict.fromkeys(u[1] for u in cell_units):
                self._cell_units(cell, [u for u in cell_units if u[1] == cell], bar)
        finally:
            bar.close()
        self._barrier()
        if not finalize:
            return False
        self._bootstrap_units()
        self._barrier()
        return self.rank == 0

    def _barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def _features(self, images_u8: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Features of the stored (uint8) images, as the metrics see a saved PNG: [0, 1], grey shown as RGB. So a
        metric added later, computed from the stored images, gives the numbers it would have given at once."""
        images = images_u8.float() / 255.0
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        return {f"f.{metric_key(n)}": self.metrics[n].features(images).to("cpu", torch.float64) for n in names}

    def _reference_unit(self, unit, missing: list[str]) -> None:
        _, _, start, count = unit
        path = self.unit_path(unit)
        stored = load_file(str(path)) if path.exists() else {}
        images = to_uint8(self.reference_images(start, count))
        atomic_save_tensors({**stored, **self._features(images, missing)}, path)

    def _add_features(self, unit, missing: list[str]) -> None:
        path = self.unit_path(unit)
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        stored = load_file(str(path))
        atomic_save_tensors({**stored, **self._features(stored["images"], missing)}, path, metadata=metadata)

    def _cell_units(self, cell: Cell, units: list, bar: Progress) -> None:
        pipe = self.pipe
        num_classes = int(pipe.transformer.config.num_embeds_ada_norm)
        pipe.scheduler = self.scheduler_for(cell.scheduler)
        method = get_method(cell.method)
        record = {
            "cell": {"scheduler": cell.scheduler, "steps": cell.steps, "cfg": cell.cfg, "method": cell.method},
            "method": method.record(cell.cfg),
            "scheduler_config": {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")},
        }
        with method.sampling(pipe, cell.cfg) as kwargs:
            for unit in units:
                _, _, start, count = unit
                seeds = range(self.spec.seed_base + start, self.spec.seed_base + start + count)
                generators = [torch.Generator().manual_seed(s) for s in seeds]
                labels = [i % num_classes for i in range(start, start + count)]
                started = time.time()
                images = pipe(
                    labels, num_inference_steps=cell.steps, generator=generators, output_type="pt", **kwargs
                ).images
                seconds = time.time() - started
                if not torch.isfinite(images).all():
                    raise ValueError(f"cell {cell.key}: non-finite images in samples {start}..{start + count - 1}")
                images_u8 = to_uint8(images)
                tensors = {"images": images_u8, **self._features(images_u8, self.spec.metrics)}
                meta = {"seconds": f"{seconds:.4f}", "record": json.dumps(record, sort_keys=True), "code": self.code,
                        "process": f"{self.rank}/{self.world}"}  # fmt: skip
                atomic_save_tensors(tensors, self.unit_path(unit), metadata=meta)
                bar.update(f"{cell.key} {start}")

    # -- reading back ------------------------------------------------------------------------------------------------------------

    def cell_complete(self, cell: Cell) -> bool:
        """Every chunk of the first n samples is stored, with every metric's features."""
        return all(not self._missing_metrics(self.cell_dir(cell) / chunk_name(s, c)) for s, c in self.spec.chunks())

    def load_cell(self, cell: Cell, what: str = "features") -> dict[str, torch.Tensor]:
        """Concatenated chunk tensors of a complete cell: features per metric name, or ``{"images": ...}``."""
        parts: dict[str, list[torch.Tensor]] = {}
        for start, count in self.spec.chunks():
            data = load_file(str(self.cell_dir(cell) / chunk_name(start, count)))
            for key, value in data.items():
                parts.setdefault(key, []).append(value)
        if what == "images":
            return {"images": torch.cat(parts["images"])}
        return {n: torch.cat(parts[f"f.{metric_key(n)}"]) for n in self.spec.metrics}

    def cell_seconds(self, cell: Cell) -> float:
        total = 0.0
        for start, count in self.spec.chunks():
            with safe_open(str(self.cell_dir(cell) / chunk_name(start, count)), "pt") as f:
                total += float(f.metadata()["seconds"])
        return total

    def cell_code(self, cell: Cell) -> list[dict]:
        """The distinct code versions that made a cell's chunks (more than one: the cell mixes code versions)."""
        seen = []
        for start, count in self.spec.chunks():
            with safe_open(str(self.cell_dir(cell) / chunk_name(start, count)), "pt") as f:
                code = json.loads(f.metadata().get("code", "{}"))
            if code not in seen:
                seen.append(code)
        return seen

    def cell_record(self, cell: Cell) -> dict:
        start, count = self.spec.chunks()[0]
        with safe_open(str(self.cell_dir(cell) / chunk_name(start, count)), "pt") as f:
            return json.loads(f.metadata()["record"])

    def load_reference(self) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, self.spec.ref_n, REFERENCE_CHUNK):
            data = load_file(str(self.out / "reference" / chunk_name(start, min(REFERENCE_CHUNK, self.spec.ref_n - start))))
            for key, value in data.items():
                parts.setdefault(key, []).append(value)
        return {n: torch.cat(parts[f"f.{metric_key(n)}"]) for n in self.spec.metrics}

    # -- bootstrap --------------------------------------------------------------------------------------------------------------

    def bootstrap_path(self, cell: Cell, metric: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_-]", "_", metric)
        return self.cell_dir(cell) / f"bootstrap-n{self.spec.n}-{safe}.safetensors"

    def bootstrap_complete(self, cell: Cell) -> bool:
        return all(self.bootstrap_path(cell, m).exists() for m in self.spec.metrics)

    def _bootstrap_units(self) -> None:
        """One unit per (complete cell, metric): every key's score on each replicate and on all n samples."""
        work = [(c, m) for c in self.spec.cells() if self.cell_complete(c) for m in self.spec.metrics]
        mine = [w for k, w in enumerate(work) if k % self.world == self.rank and not self.bootstrap_path(*w).exists()]
        if not mine:
            return
        reference = self.load_reference()
        indices = bootstrap_indices(self.spec.n, self.spec.bootstrap, self.spec.bootstrap_seed)
        bar = Progress(len(mine), f"bootstrap[{self.rank}]" if self.world > 1 else "bootstrap", self.progress)
        try:
            for cell, name in mine:
                features = self.load_cell(cell)[name]
                scorer = replicate_scorer(self.metrics[name], features, reference[name])
                point = scorer(np.arange(self.spec.n))
                tensors: dict[str, torch.Tensor] = {}
                for key, values in replicate_table(scorer, indices).items():
                    tensors[f"{metric_key(name)}.{key}"] = torch.from_numpy(values)
                    tensors[f"point.{metric_key(name)}.{key}"] = torch.tensor([point[key]], dtype=torch.float64)
                atomic_save_tensors(tensors, self.bootstrap_path(cell, name))
                bar.update(f"{cell.key} {name}")
        finally:
            bar.close()

    def load_bootstrap(self, cell: Cell) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """(point scores, replicate scores) per ``metric.key``, every metric of the spec."""
        point: dict[str, float] = {}
        reps: dict[str, np.ndarray] = {}
        for metric in self.spec.metrics:
            data = load_file(str(self.bootstrap_path(cell, metric)))
            point.update({k[len("point.") :]: float(v[0]) for k, v in data.items() if k.startswith("point.")})
            reps.update({k: v.numpy() for k, v in data.items() if not k.startswith("point.")})
        return point, reps


def baseline_of(cell: Cell) -> Cell:
    return cell if cell.method == BASELINE else cell.baseline()


__all__ = ["Progress", "Study", "load_metrics", "to_uint8"]
