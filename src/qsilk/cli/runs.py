"""The generation loop: one image per (condition, seed, QSilk config), each written atomically as a PNG that
carries its reproduction record (PNG text key ``qsilk``) plus a JSON sidecar with the same record and timings.

An image is identified by its reproduction parameters (``params``): its file name holds a short hash of them,
and a rerun skips an image whose PNG and sidecar already exist with equal parameters, so long runs resume.
One image per pipeline call with its own CPU generator: an image never depends on its batch mates, the order of
the run, or which images were skipped.

Records are standard JSON (RFC 8259, what browsers' ``JSON.parse`` accepts): a non-finite number in a scheduler
config (DPM-Solver's ``lambda_min_clipped = -inf``) is written as the string ``"-Infinity"`` (``"Infinity"``,
``"NaN"``), and a non-finite statistic as ``null``.

On resume a finished image is reused only if its PNG decodes completely, its PNG record and sidecar agree, and (for
``compare``) its ``.maps.npz`` loads; a damaged one is reported by name and made again. Temp files left by a run
killed between write and rename are removed by the next run.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import shlex
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qsilk.files import atomic_write_bytes, atomic_write_text
from qsilk.stabilizer import STAT_KEYS as QSILK_STAT_KEYS

from .errors import CliError, SamplingError, one_line

RECORD_FORMAT = "qsilk-image/1"
PNG_KEY = "qsilk"
# Per-step keys of an image's record: the step's position, QSilk's own statistics, and where the confidence came from.
STAT_KEYS = ("step", "progress", "timestep", "sigma", *QSILK_STAT_KEYS, "confidence_source")
# Temp files of qsilk.files.temp_path (``.NAME.PID.tmp``) and of make_dir's write test.
TMP_FILE = re.compile(r"^\.(?:.+\.(\d+)\.tmp|qsilk-write-test-(\d+))$")
# Without a terminal (CI, nohup, pipes) progress is one line at most this often (plus the first and the last).
PROGRESS_INTERVAL_S = 10.0


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
    qrm: dict[str, Any] | None = None  # qsilk.qrm.cli.attach_qrm_option's record when --qrm is given


@dataclass(frozen=True)
class Job:
    condition: Condition
    seed: int
    qsilk: dict[str, Any] | None  # QSilkConfig.to_dict(), or None for plain sampling
    folder: str = ""  # sub-folder of the output folder
    qrm: bool | None = None  # with a QRM attached (settings.qrm): False switches it off for this image (compare)


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
    seeds: dict[int, None] = {}  # an ordered set: membership is O(1), so 100,000 seeds parse in milliseconds
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
            seeds.update(dict.fromkeys(range(lo, hi + 1)))
    if not seeds:
        raise CliError("no seeds given")
    return list(seeds)


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
    if isinstance(value, float) and not math.isfinite(value):
        return nonfinite_name(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def nonfinite_name(value: float) -> str:
    """How a non-finite float is written in our JSON: the JavaScript spelling, as a string."""
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def to_json(data: Any, **kwargs: Any) -> str:
    """``json.dumps`` that refuses NaN/Infinity instead of writing non-standard JSON."""
    return json.dumps(data, allow_nan=False, **kwargs)


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
    if uses_qrm(settings, job):  # only when used: keeps the keys of images made without QRM unchanged
        params["qrm"] = settings.qrm
    return params


def uses_qrm(settings: Settings, job: Job) -> bool:
    """Whether this image is made with the attached QRM (every image of ``generate --qrm``; per column in compare)."""
    return settings.qrm is not None and job.qrm is not False


def _set_qrm(pipe, settings: Settings, job: Job) -> None:
    if settings.qrm is not None:
        from qsilk.qrm import attached

        attached(pipe).enabled = uses_qrm(settings, job)


def params_key(params: dict[str, Any]) -> str:
    blob = to_json(params, sort_keys=True, separators=(",", ":"))
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
    if params.get("qrm"):
        args += ["--qrm", params["qrm"]["path"]]
    if params["qsilk"] is None:
        args.append("--no-qsilk")
    else:
        args += ["--config", to_json(params["qsilk"], separators=(",", ":"))]
    return " ".join(shlex.quote(a) for a in args)


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
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
        "confidence_sources": confidence_sources(stats),
        "per_step": [{k: _round(s.get(k)) for k in STAT_KEYS if k in s} for s in stats],
    }


def confidence_sources(stats: list[dict[str, Any]]) -> dict[str, int] | None:
    """How many steps used each confidence source (the handle's per-step ``confidence_source``: e.g. attention,
    or structure when the attention probe fell back); None when the stats do not say."""
    counts: dict[str, int] = {}
    for s in stats:
        source = s.get("confidence_source")
        if source is not None:
            counts[str(source)] = counts.get(str(source), 0) + 1
    return counts or None


# ---------------------------------------------------------------------------------------------- files


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
    # os.access says yes to root even on read-only or virtual file systems (/proc): create and remove an entry.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".qsilk-probe-", dir=probe))
    except OSError as err:
        raise CliError(f"output folder {out} is not writable: cannot create anything in {probe} ({err.strerror or err})") from None


def make_dir(out: Path) -> None:
    """Create ``out`` and prove it takes a file (``os.access`` says yes to root even on read-only mounts)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".qsilk-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CliError(f"output folder {out} is not writable: {err.strerror or err}") from None


def _folders(root: Path) -> set[Path]:
    return {Path(d) for d, _, _ in os.walk(root)} if root.is_dir() else set()


@contextlib.contextmanager
def output_folder(out: Path) -> Iterator[Path]:
    """Create ``out`` for a command; if the command then fails, remove every folder it created that is still
    empty, so a failed run leaves no empty output folders behind (finished images are kept)."""
    out = Path(out).expanduser()
    root = out
    while not root.parent.exists() and root.parent != root:
        root = root.parent
    existed = _folders(root)
    make_dir(out)
    try:
        yield out
    except BaseException:
        for folder in sorted(_folders(root) - existed, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds when empty
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def clean_temp_files(folders: Iterable[Path]) -> list[Path]:
    """Remove the temp files of :func:`qsilk.files.atomic_write_bytes` / :func:`make_dir` that a killed run left behind
    (their writer's pid is in the name; a live writer's files are left alone)."""
    removed = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = TMP_FILE.match(path.name)
            if not match or not path.is_file():
                continue
            pid = int(match.group(1) or match.group(2))
            if pid != os.getpid() and _alive(pid):
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


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


@dataclass
class _Finished:
    sidecar: dict[str, Any]
    image: np.ndarray
    maps: dict[str, np.ndarray] | None


def _load_finished(paths: _Paths, params: dict[str, Any], need_maps: bool) -> tuple[_Finished | None, str | None]:
    """An already finished image with these exact parameters, fully read back, or (None, why it is damaged).

    A missing sidecar is a normal interrupted image (no message); anything present but unreadable or
    inconsistent is damage, reported by the caller and made again."""
    if not paths.sidecar.is_file():
        return None, None
    try:
        sidecar = json.loads(paths.sidecar.read_text())
        if not isinstance(sidecar, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return None, f"unreadable sidecar {paths.sidecar.name} ({one_line(err)})"
    if sidecar.get("params") != params:
        return None, None  # another image's sidecar (a hash collision): make ours
    if not paths.png.is_file():
        return None, f"{paths.png.name} is missing"
    try:
        image = load_png(paths.png)  # decodes every pixel: a truncated file fails here
        record = read_png_record(paths.png)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError ... for damaged files
        return None, f"damaged PNG {paths.png.name} ({type(err).__name__}: {one_line(err)})"
    if record is None or record.get("params") != params:
        return None, f"{paths.png.name} does not carry this image's record"
    maps = None
    if paths.maps.is_file() or need_maps:
        try:
            with np.load(paths.maps) as data:
                maps = {k: data[k] for k in data.files}
        except Exception as err:  # empty/corrupt zip: BadZipFile, EOFError, ValueError, OSError ...
            if not paths.maps.is_file():
                return None, f"{paths.maps.name} is missing"
            return None, f"damaged maps {paths.maps.name} ({type(err).__name__}: {one_line(err)})"
        if need_maps and "steps" not in maps:
            return None, f"damaged maps {paths.maps.name} (no per-step data)"
    return _Finished(sidecar, image, maps), None


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


def diverged(what: str) -> SamplingError:
    """The one message for a sampler that diverged, whether QSilk saw it first or the decoded image did."""
    return SamplingError(f"the sampler diverged (NaN/Inf) for {what}; try another --scheduler or a lower --cfg")


def _sample(pipe, kwargs: dict[str, Any], what: str):
    try:
        return pipe(**kwargs)
    except ValueError as err:
        # QSilk's operators refuse non-finite x0 (qsilk.ops._checks.check_latent): the sampler diverged upstream.
        if "non-finite" in str(err):
            raise diverged(what) from None
        raise


def _to_uint8(images, what: str = "image") -> np.ndarray:
    array = np.asarray(images[0], dtype=np.float32)
    if not np.isfinite(array).all():
        raise diverged(what)
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


def say(console, text: str) -> None:
    """One plain line on the console: no markup (paths may hold brackets), no wrapping (logs are grepped)."""
    if console is not None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)


class _Progress:
    """A rich progress bar on a terminal; without one (CI, nohup, a pipe) a line per finished image, at most one
    every ``PROGRESS_INTERVAL_S`` seconds plus the first and the last, so a log shows the run is alive."""

    def __init__(self, console, total: int, steps: int) -> None:
        self.console, self.total, self.steps, self.done = console, total, steps, 0
        self.live = console is not None and console.is_terminal and total > 0
        self.last_line: float | None = None
        self.bar = None

    def __enter__(self) -> _Progress:
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=self.console, transient=False,
            )  # fmt: skip
            self.bar.start()
            self.task = self.bar.add_task("images", total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description="images")
            self.bar.stop()

    def step(self, what: str, i: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=f"{what}: step {i}/{self.steps}")

    def finished(self, what: str, seconds: float) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.advance(self.task)
            return
        now = time.monotonic()
        if self.last_line is None or now - self.last_line >= PROGRESS_INTERVAL_S or self.done == self.total:
            say(self.console, f"[{self.done}/{self.total}] {what}: {seconds:.2f} s")
            self.last_line = now


def run_jobs(
    pipe,
    settings: Settings,
    jobs: list[Job],
    out: Path,
    *,
    versions: dict[str, str],
    record_maps: bool = False,
    measure_plain: bool = False,
    warmup: bool = False,
    console=None,
) -> list[ImageResult]:
    """Generate (or reuse) every job's image, writing PNG + sidecar (+ maps when ``record_maps``).

    ``warmup``: one untimed pipeline call before the first timed image, so first-call costs (lazy
    initialisation, allocator, kernel selection) are not charged to whichever config happens to run first."""
    import torch

    results: list[ImageResult | None] = [None] * len(jobs)
    planned = []
    for index, job in enumerate(jobs):
        params = job_params(settings, job)
        key = params_key(params)
        planned.append((index, job, params, key, _paths(out, job, key)))

    removed = clean_temp_files({Path(out)} | {item[4].png.parent for item in planned})
    if removed:
        say(console, f"removed {len(removed)} temp file(s) left by an interrupted run")
    pending = []
    for index, job, params, key, paths in planned:
        finished, problem = _load_finished(paths, params, record_maps and job.qsilk is not None)
        if finished is None:
            if problem is not None:
                say(console, f"redoing {paths.png}: {problem}")
                paths.sidecar.unlink(missing_ok=True)  # not done until it is written again
            pending.append((index, job, params, key, paths))
            continue
        stats = (finished.sidecar.get("stats") or {}).get("per_step", [])
        results[index] = ImageResult(
            job, paths.png, finished.sidecar, finished.image, True, finished.sidecar.get("seconds"), stats,
            finished.maps,
        )  # fmt: skip
    if len(pending) < len(jobs):
        say(console, f"{len(jobs) - len(pending)} of {len(jobs)} image(s) already done in {out}; reusing them")

    # Group by QSilk config so each patch is installed once; images do not depend on the order anyway.
    groups: dict[str, list] = {}
    for item in pending:
        groups.setdefault(to_json(item[1].qsilk, sort_keys=True), []).append(item)

    started = time.perf_counter()
    with _Progress(console, len(pending), settings.steps) as progress:
        if warmup and pending:
            _, job, *_ = pending[0]
            _set_qrm(pipe, settings, job)
            kwargs = _call_kwargs(pipe, settings, job, torch.Generator("cpu").manual_seed(job.seed), None)
            _sample(pipe, kwargs, f"{job.condition.label} seed {job.seed} (warm-up)")
        for items in groups.values():
            with _qsilk_patch(pipe, items[0][1].qsilk, record_maps, measure_plain) as handle:
                for index, job, params, key, paths in items:
                    what = f"{job.condition.label} seed {job.seed}" + (f" [{job.folder}]" if job.folder else "")
                    if handle is not None:
                        handle.clear_stats()
                    _set_qrm(pipe, settings, job)
                    generator = torch.Generator("cpu").manual_seed(job.seed)
                    kwargs = _call_kwargs(pipe, settings, job, generator, lambda i, what=what: progress.step(what, i))
                    start = time.perf_counter()
                    output = _sample(pipe, kwargs, what)
                    seconds = time.perf_counter() - start
                    image = _to_uint8(output.images, what)
                    stats = [dict(s) for s in handle.stats] if handle is not None else []
                    maps = _maps_arrays(list(getattr(handle, "maps", None) or [])) if record_maps else None
                    results[index] = _write(job, params, key, paths, image, stats, maps, seconds, versions)
                    progress.finished(what, seconds)
    if pending:
        elapsed = time.perf_counter() - started
        say(console, f"{len(pending)} image(s) made in {elapsed:.1f} s ({elapsed / len(pending):.2f} s/image)")
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
    atomic_write_bytes(paths.png, png_bytes(image, {PNG_KEY: to_json(record, sort_keys=True)}))
    if maps:
        buf = io.BytesIO()
        np.savez_compressed(buf, **maps)
        atomic_write_bytes(paths.maps, buf.getvalue())
    sidecar = {**record, "file": paths.png.name, "seconds": round(seconds, 4), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    # The sidecar goes last: an image counts as done (and is skipped on resume) only once it exists.
    atomic_write_text(paths.sidecar, to_json(sidecar, indent=2, sort_keys=True) + "\n")
    return ImageResult(job, paths.png, sidecar, image, False, seconds, stats, maps)
