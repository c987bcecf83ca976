"""The generation loop: one image per (condition, seed, QSilk config), each written atomically as a PNG that
carries its reproduction record (PNG text key ``qsilk``) plus a JSON sidecar with the same record and timings.

An image is identified by its reproduction parameters (``params``): its file name holds a short hash of them,
and a rerun skips an image whose PNG and sidecar already exist with equal parameters, so long runs resume.
One image per pipeline call with its own CPU generator: an image never depends on its batch mates, the order of
the run, or which images were skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CliError, SamplingError

RECORD_FORMAT = "qsilk-image/1"
PNG_KEY = "qsilk"
STAT_KEYS = (
    "step",
    "progress",
    "timestep",
    "sigma",
    "clamp_fraction",
    "aqclip_fraction",
    "touched_fraction",
    "max_abs_before",
    "max_abs_after",
    "clamp_active",
    "aqclip_active",
    "confidence_mean",
)


@dataclass(frozen=True)
class Condition:
    """What one image is conditioned on: a class (id and name) or a prompt (and optional negative prompt)."""

    class_id: int | None = None
    class_name: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None

    def record(self) -> dict[str, Any]:
        if self.class_id is not None:
            return {"class_id": self.class_id, "class_name": self.class_name}
        out: dict[str, Any] = {"prompt": self.prompt}
        if self.negative_prompt:
            out["negative_prompt"] = self.negative_prompt
        return out

    @property
    def label(self) -> str:
        if self.class_id is not None:
            return self.class_name or str(self.class_id)
        return str(self.prompt)

    @property
    def slug(self) -> str:
        return slugify(self.label)


@dataclass(frozen=True)
class Settings:
    """Everything shared by the images of one command."""

    model: dict[str, str]
    pipeline: str
    steps: int
    cfg: float
    scheduler: str
    scheduler_config: dict[str, Any]
    device: str
    dtype: str
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class Job:
    condition: Condition
    seed: int
    qsilk: dict[str, Any] | None  # QSilkConfig.to_dict(), or None for plain sampling
    folder: str = ""  # sub-folder of the output folder


@dataclass
class ImageResult:
    job: Job
    path: Path
    record: dict[str, Any]
    image: np.ndarray  # (H, W, 3) uint8
    skipped: bool
    seconds: float | None
    stats: list[dict[str, Any]] = field(default_factory=list)
    maps: dict[str, np.ndarray] | None = None  # "confidence" / "delta": (steps, H, W) float32, for compare


def slugify(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "image"


def parse_seeds(values: Iterable[str]) -> list[int]:
    """``--seed`` values: integers, ranges ``a-b`` (inclusive) and comma lists, in order, duplicates dropped."""
    seeds: list[int] = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not match:
                raise CliError(f"invalid seed {part!r}; use a non-negative integer or a range like 0-7")
            lo = int(match.group(1))
            hi = int(match.group(2)) if match.group(2) is not None else lo
            if hi < lo:
                raise CliError(f"invalid seed range {part!r}: end before start")
            if hi >= 2**63:
                raise CliError(f"seed {hi} is too large (max 2**63 - 1)")
            if hi - lo >= 100_000:
                raise CliError(f"seed range {part!r} is too long (at most 100000 seeds)")
            seeds.extend(s for s in range(lo, hi + 1) if s not in seeds)
    if not seeds:
        raise CliError("no seeds given")
    return seeds


def _jsonable(value: Any) -> Any:
    """Scheduler configs hold tuples, numpy scalars and FrozenDicts; turn them into plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def scheduler_record(pipe) -> tuple[str, dict[str, Any]]:
    return type(pipe.scheduler).__name__, _jsonable(dict(pipe.scheduler.config))


def job_params(settings: Settings, job: Job) -> dict[str, Any]:
    """The reproduction parameters of one image: equal parameters -> the same image (on the same machine)."""
    params: dict[str, Any] = {
        "model": settings.model,
        "pipeline": settings.pipeline,
        **job.condition.record(),
        "seed": job.seed,
        "steps": settings.steps,
        "cfg": settings.cfg,
        "scheduler": settings.scheduler,
        "scheduler_config": settings.scheduler_config,
        "device": settings.device,
        "dtype": settings.dtype,
        "qsilk": job.qsilk,
    }
    if settings.width is not None or settings.height is not None:
        params["width"], params["height"] = settings.width, settings.height
    return params


def params_key(params: dict[str, Any]) -> str:
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def reproduce_command(params: dict[str, Any]) -> str:
    """A ``qsilk generate`` command line that makes this image again."""
    model = params["model"]
    args = ["qsilk", "generate", "--model", model["location"] if model["kind"] != "demo" else "demo"]
    if "class_id" in params:
        args += ["--class", str(params["class_id"])]
    else:
        args += ["--prompt", params["prompt"]]
        if params.get("negative_prompt"):
            args += ["--negative-prompt", params["negative_prompt"]]
    args += ["--seed", str(params["seed"]), "--steps", str(params["steps"]), "--cfg", repr(params["cfg"])]
    args += ["--scheduler", params["scheduler"], "--device", params["device"], "--dtype", params["dtype"]]
    if params.get("width") is not None:
        args += ["--width", str(params["width"]), "--height", str(params["height"])]
    if params["qsilk"] is None:
        args.append("--no-qsilk")
    else:
        args += ["--config", json.dumps(params["qsilk"], separators=(",", ":"))]
    return " ".join(shlex.quote(a) for a in args)


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


def summarize_stats(stats: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per-step QSilk statistics -> aggregates plus a compact per-step table."""
    if not stats:
        return None

    def values(key: str) -> list[float]:
        return [float(s[key]) for s in stats if isinstance(s.get(key), int | float)]

    def mean(key: str) -> float | None:
        v = values(key)
        return _round(sum(v) / len(v)) if v else None

    def peak(key: str) -> float | None:
        v = values(key)
        return _round(max(v)) if v else None

    return {
        "steps": len(stats),
        "active_steps": sum(1 for s in stats if s.get("clamp_active") or s.get("aqclip_active")),
        "touched_fraction_mean": mean("touched_fraction"),
        "touched_fraction_max": peak("touched_fraction"),
        "clamp_fraction_mean": mean("clamp_fraction"),
        "aqclip_fraction_mean": mean("aqclip_fraction"),
        "max_abs_before": peak("max_abs_before"),
        "max_abs_after": peak("max_abs_after"),
        "confidence_mean": mean("confidence_mean"),
        "per_step": [{k: _round(s.get(k)) for k in STAT_KEYS if k in s} for s in stats],
    }


# ---------------------------------------------------------------------------------------------- files


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a hidden temp file in the same folder, then rename over ``path``: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def png_bytes(image: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """Encode (H, W, 3) uint8 as PNG with text chunks; the same pixels and text give the same bytes."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_png_record(path: str | Path) -> dict[str, Any] | None:
    """The reproduction record stored in a PNG written by the CLI (None if it has none)."""
    from PIL import Image

    with Image.open(path) as img:
        text = img.text.get(PNG_KEY) if hasattr(img, "text") else None
    return json.loads(text) if text else None


def load_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).copy()


def ensure_writable_dir(out: Path) -> None:
    """Fail early if ``out`` cannot become a writable folder (checked before any model is loaded)."""
    out = Path(out).expanduser()
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise CliError(f"output folder {out} cannot be created: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CliError(f"output folder {out} is not writable ({probe} is read-only for this user)")


def make_dir(out: Path) -> None:
    """Create ``out`` and prove it takes a file (``os.access`` says yes to root even on read-only mounts)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".qsilk-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CliError(f"output folder {out} is not writable: {err.strerror or err}") from None


# ---------------------------------------------------------------------------------------------- running


@dataclass
class _Paths:
    png: Path
    sidecar: Path
    maps: Path


def _paths(out: Path, job: Job, key: str) -> _Paths:
    folder = out / job.folder if job.folder else out
    stem = f"{job.condition.slug}-seed{job.seed}-{key}"
    return _Paths(folder / f"{stem}.png", folder / f"{stem}.json", folder / f"{stem}.maps.npz")


def _existing(paths: _Paths, params: dict[str, Any], need_maps: bool) -> dict[str, Any] | None:
    """The sidecar of an already finished image with these exact parameters, else None."""
    if not (paths.png.is_file() and paths.sidecar.is_file()) or (need_maps and not paths.maps.is_file()):
        return None
    try:
        sidecar = json.loads(paths.sidecar.read_text())
    except (OSError, ValueError):
        return None
    same = json.dumps(sidecar.get("params"), sort_keys=True) == json.dumps(params, sort_keys=True)
    return sidecar if same else None


def _call_kwargs(pipe, settings: Settings, job: Job, generator, on_step: Callable[[int], None] | None) -> dict:
    import inspect

    accepted = inspect.signature(pipe.__call__).parameters
    kwargs: dict[str, Any] = {
        "num_inference_steps": settings.steps,
        "guidance_scale": settings.cfg,
        "generator": generator,
        "output_type": "np",
    }
    cond = job.condition
    if cond.class_id is not None:
        kwargs["class_labels"] = [cond.class_id]
    else:
        kwargs["prompt"] = cond.prompt
        if cond.negative_prompt:
            kwargs["negative_prompt"] = cond.negative_prompt
        if settings.width is not None:
            kwargs["width"], kwargs["height"] = settings.width, settings.height
    if on_step is not None and "callback_on_step_end" in accepted:

        def callback(_pipe, i, _t, callback_kwargs):
            on_step(i + 1)
            return callback_kwargs

        kwargs["callback_on_step_end"] = callback
    return kwargs


def _to_uint8(images, what: str = "image") -> np.ndarray:
    array = np.asarray(images[0], dtype=np.float32)
    if not np.isfinite(array).all():
        raise SamplingError(f"the sampler produced NaN/Inf for {what}; try another --scheduler or fewer --cfg")
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return (np.clip(array[..., :3], 0.0, 1.0) * 255).round().astype(np.uint8)


def _maps_arrays(maps: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Handle maps (per step, (1, 1, H, W) tensors or None) -> (steps, H, W) float32 arrays (NaN where absent)."""
    out = {}
    for name in ("confidence", "delta"):
        frames = [m.get(name) for m in maps]
        shape = next((tuple(f.shape[-2:]) for f in frames if f is not None), None)
        if shape is None:
            continue
        stack = [
            f.detach().float().cpu().numpy().reshape(-1, *shape)[0] if f is not None else np.full(shape, np.nan)
            for f in frames
        ]
        out[name] = np.stack(stack).astype(np.float32)
    if maps:
        out["steps"] = np.asarray([int(m.get("step", i)) for i, m in enumerate(maps)])
    return out


@contextlib.contextmanager
def _qsilk_patch(pipe, config: dict[str, Any] | None, record_maps: bool, measure_plain: bool) -> Iterator:
    """Yield the QSilk handle for this config; for plain sampling, a no-op config's handle (bit-identical by
    contract) when ``measure_plain`` asks for the x0 statistics of the unmodified sampler, else None."""
    import qsilk

    if config is None and not measure_plain:
        yield None
        return
    cfg = qsilk.QSilkConfig.noop() if config is None else qsilk.QSilkConfig.from_dict(config)
    handle = qsilk.enable(pipe, cfg, record_maps=record_maps and config is not None)
    try:
        yield handle
    finally:
        qsilk.disable(pipe)


def run_jobs(
    pipe,
    settings: Settings,
    jobs: list[Job],
    out: Path,
    *,
    versions: dict[str, str],
    record_maps: bool = False,
    measure_plain: bool = False,
    console=None,
) -> list[ImageResult]:
    """Generate (or reuse) every job's image, writing PNG + sidecar (+ maps when ``record_maps``)."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    results: list[ImageResult | None] = [None] * len(jobs)
    planned = []
    for index, job in enumerate(jobs):
        params = job_params(settings, job)
        key = params_key(params)
        paths = _paths(out, job, key)
        planned.append((index, job, params, key, paths))

    # Group by QSilk config so each patch is installed once; images do not depend on the order anyway.
    groups: dict[str, list] = {}
    for item in planned:
        groups.setdefault(json.dumps(item[1].qsilk, sort_keys=True), []).append(item)

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=console is None,
    )
    with progress:
        task = progress.add_task("images", total=len(jobs))
        for items in groups.values():
            pending = []
            for index, job, params, key, paths in items:
                sidecar = _existing(paths, params, record_maps and job.qsilk is not None)
                if sidecar is None:
                    pending.append((index, job, params, key, paths))
                    continue
                maps = dict(np.load(paths.maps)) if paths.maps.is_file() else None
                stats = (sidecar.get("stats") or {}).get("per_step", [])
                results[index] = ImageResult(
                    job, paths.png, sidecar, load_png(paths.png), True, sidecar.get("seconds"), stats, maps
                )
                if console is not None:
                    progress.console.print(f"skip (done): {paths.png}")
                progress.advance(task)
            if not pending:
                continue
            with _qsilk_patch(pipe, pending[0][1].qsilk, record_maps, measure_plain) as handle:
                for index, job, params, key, paths in pending:
                    what = f"{job.condition.label} seed {job.seed}" + (f" [{job.folder}]" if job.folder else "")

                    def on_step(i: int, what: str = what) -> None:
                        progress.update(task, description=f"{what}: step {i}/{settings.steps}")

                    if handle is not None:
                        handle.clear_stats()
                    generator = torch.Generator("cpu").manual_seed(job.seed)
                    start = time.perf_counter()
                    output = pipe(**_call_kwargs(pipe, settings, job, generator, on_step))
                    seconds = time.perf_counter() - start
                    image = _to_uint8(output.images, what)
                    stats = [dict(s) for s in handle.stats] if handle is not None else []
                    maps = _maps_arrays(list(getattr(handle, "maps", None) or [])) if record_maps else None
                    results[index] = _write(job, params, key, paths, image, stats, maps, seconds, versions)
                    progress.advance(task)
        progress.update(task, description="images")
    return [r for r in results if r is not None]


def _write(job, params, key, paths: _Paths, image, stats, maps, seconds, versions) -> ImageResult:
    summary = summarize_stats(stats)
    if job.qsilk is None and summary is not None:
        summary["measured_with"] = "QSilkConfig.noop() (bit-identical to plain sampling)"
    record = {
        "format": RECORD_FORMAT,
        "key": key,
        "params": params,
        "versions": versions,
        "stats": summary,
        "reproduce": reproduce_command(params),
    }
    paths.png.parent.mkdir(parents=True, exist_ok=True)
    # The PNG holds no timings, so the same arguments give the same bytes.
    atomic_write_bytes(paths.png, png_bytes(image, {PNG_KEY: json.dumps(record, sort_keys=True)}))
    if maps:
        buf = io.BytesIO()
        np.savez_compressed(buf, **maps)
        atomic_write_bytes(paths.maps, buf.getvalue())
    sidecar = {**record, "file": paths.png.name, "seconds": round(seconds, 4), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    # The sidecar goes last: an image counts as done (and is skipped on resume) only once it exists.
    atomic_write_text(paths.sidecar, json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return ImageResult(job, paths.png, sidecar, image, False, seconds, stats, maps)
