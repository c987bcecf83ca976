"""Which model a ``--model`` value names, loading it, and what it is conditioned on.

``--model`` accepts, in this order:
- nothing or ``demo``: the embedded demo model (``QSILK_DEMO_MODEL`` overrides its folder);
- a local diffusers folder (``model_index.json``);
- a single-file checkpoint (``.safetensors`` / ``.ckpt``), loaded with the pipeline class's ``from_single_file``
  (``--model-config`` names a local diffusers folder with the component configs, needed offline);
- anything else of the form ``owner/name``: passed to ``DiffusionPipeline.from_pretrained`` unchanged (hub id).

Everything here that can be checked without loading weights is checked before loading, so a typo costs nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CliError, one_line

DEMO_ENV = "QSILK_DEMO_MODEL"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
_MODEL_SUFFIXES = (*SINGLE_FILE_SUFFIXES, ".pt", ".pth", ".bin", ".json", ".onnx", ".gguf")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
DTYPES = ("fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class ModelSource:
    """A validated ``--model`` value. ``kind``: "demo", "folder", "single_file" or "hub"."""

    kind: str
    location: str
    spec: str

    def record(self) -> dict[str, str]:
        """What goes into every image's metadata to say which model made it."""
        return {"spec": self.spec, "kind": self.kind, "location": self.location}


def demo_model_dir() -> Path:
    """The demo model folder: ``$QSILK_DEMO_MODEL`` if set, else the one shipped in the package."""
    override = os.environ.get(DEMO_ENV)
    if override:
        return Path(override).expanduser()
    from qsilk.models.demo import DEMO_MODEL_DIR

    return Path(DEMO_MODEL_DIR)


def resolve_model(spec: str | None) -> ModelSource:
    """Classify and validate a ``--model`` value without loading anything."""
    if spec is None or spec.strip().lower() == "demo":
        folder = demo_model_dir()
        if not (folder / "model_index.json").is_file():
            raise CliError(
                f"the demo model's weights are not installed (no model_index.json in {folder}); "
                f"pass --model <folder | .safetensors | hub id> or set {DEMO_ENV} to a demo model folder"
            )
        return ModelSource("demo", str(folder.resolve()), "demo")
    spec = spec.strip()
    if not spec:
        raise CliError("--model is empty")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CliError(f"model folder {spec} is not a diffusers pipeline (no model_index.json in it)")
        return ModelSource("folder", str(path.resolve()), spec)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise CliError(
                f"model file {spec} has an unsupported type {path.suffix!r}; "
                f"single-file checkpoints must be {' or '.join(SINGLE_FILE_SUFFIXES)}"
            )
        return ModelSource("single_file", str(path.resolve()), spec)
    if path.exists():
        raise CliError(f"model path {spec} is neither a folder nor a file")
    looks_like_path = (
        spec.startswith(("/", ".", "~"))
        or "\\" in spec
        or spec.count("/") > 1
        or spec.lower().endswith(_MODEL_SUFFIXES)
    )
    if looks_like_path or not _HUB_ID.match(spec):
        raise CliError(f"model path {spec} does not exist (and it is not a hub id of the form owner/name)")
    return ModelSource("hub", spec, spec)


def resolve_scheduler(name: str | None) -> str | None:
    """A short name (``ddim``, ``euler_a``, ...) or a diffusers scheduler class name -> the class name."""
    if name is None:
        return None
    import diffusers
    from diffusers import SchedulerMixin

    from qsilk.models.demo import SCHEDULER_NAMES

    key = name.strip()
    if key.lower() in SCHEDULER_NAMES:
        return SCHEDULER_NAMES[key.lower()]
    try:
        cls = getattr(diffusers, key)
    except (AttributeError, ImportError, RuntimeError):
        cls = None
    if isinstance(cls, type) and issubclass(cls, SchedulerMixin):
        return cls.__name__
    raise CliError(
        f"unknown scheduler {name!r}; use one of {', '.join(sorted(SCHEDULER_NAMES))} "
        "or a diffusers scheduler class name (e.g. EulerDiscreteScheduler)"
    )


def swap_scheduler(pipe, class_name: str | None) -> None:
    """Rebuild ``pipe.scheduler`` as ``class_name`` from the current scheduler's config (same betas etc.)."""
    if class_name is None or type(pipe.scheduler).__name__ == class_name:
        return
    import diffusers

    try:
        pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config)
    except Exception as err:  # a scheduler that cannot take this model's config
        raise CliError(f"cannot use scheduler {class_name} with this model: {one_line(err)}") from None


def resolve_device(name: str) -> str:
    import torch

    name = name.lower()
    if name not in DEVICES:
        raise CliError(f"unknown device {name!r}; choose from {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise CliError("--device mps: no MPS device is available")
    return name


def resolve_dtype(name: str):
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name.lower() not in table:
        raise CliError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return table[name.lower()]


def _single_file_class(path: str, config: str | None, class_name: str | None) -> type:
    """The pipeline class for a single-file checkpoint: given, read from ``--model-config``, or guessed from keys."""
    import diffusers

    if class_name is None and config is not None and (Path(config) / "model_index.json").is_file():
        class_name = json.loads((Path(config) / "model_index.json").read_text()).get("_class_name")
    if class_name is None:
        class_name = _guess_single_file_class(path)
    cls = getattr(diffusers, class_name, None) if class_name else None
    if not (isinstance(cls, type) and hasattr(cls, "from_single_file")):
        raise CliError(f"pipeline class {class_name!r} cannot load single-file checkpoints")
    return cls


def _guess_single_file_class(path: str) -> str:
    """Tell the model family from the checkpoint's key names alone (no tensors are read)."""
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                keys = list(f.keys())
        except Exception as err:
            raise CliError(f"cannot read checkpoint {path}: {one_line(err)}") from None
    else:  # a pickled .ckpt: only the pipeline class guess needs keys; load lazily via mmap
        import torch

        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as err:
            if "mmap" not in str(err) and "zipfile" not in str(err):
                raise CliError(f"cannot read checkpoint {path}: {one_line(err)}") from None
            # torch's legacy (pre-1.6, non-zip) format cannot be memory-mapped: guessing would read all of it.
            raise CliError(
                f"cannot tell which pipeline checkpoint {path} is for: it is in torch's legacy (non-zip) format, "
                "whose keys cannot be read without loading the whole file; pass --pipeline-class "
                "(e.g. StableDiffusionPipeline)"
            ) from None
        except Exception as err:
            raise CliError(f"cannot read checkpoint {path}: {one_line(err)}") from None
        if not isinstance(state, dict):
            raise CliError(f"cannot read checkpoint {path}: it holds a {type(state).__name__}, not a state dict")
        keys = list(state.get("state_dict", state))
    joined = "\n".join(keys)
    if "conditioner.embedders.1." in joined:
        return "StableDiffusionXLPipeline"
    if "model.diffusion_model.joint_blocks." in joined:
        return "StableDiffusion3Pipeline"
    if "double_blocks." in joined:
        return "FluxPipeline"
    if "model.diffusion_model.input_blocks." in joined:
        return "StableDiffusionPipeline"
    raise CliError(f"cannot tell which pipeline checkpoint {path} is for; pass --pipeline-class")


_LIBRARY_LOGGERS = ("diffusers", "transformers", "huggingface_hub")
_FP16_CPU_WARNING = "cannot run with `cpu` device"


@contextlib.contextmanager
def _library_logs() -> Iterator[list[logging.LogRecord]]:
    """Collect what diffusers / transformers / huggingface_hub log while loading instead of letting it reach the
    terminal: a failed load then ends in our one ``error:`` line, a successful one re-emits what matters."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.WARNING)
    saved = []
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers, logger.propagate = [handler], False
    try:
        yield records
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate


def _load_error(source: ModelSource, err: Exception, model_config: str | None) -> CliError:
    """One line for a failed load; diffusers' "see the stacktrace above" is dropped (we print no stack trace)."""
    message = re.sub(r"\s*Please check out the root cause in the stacktrace above\.?", "", one_line(err))
    cause = err.__cause__
    if source.kind == "hub" and cause is not None:
        message = (
            f"it is not in the local Hugging Face cache and the Hub could not be reached "
            f"({type(cause).__name__}: {one_line(cause)}); download it first or pass a local folder"
        )
    elif source.kind == "single_file" and model_config is None:
        message += " (offline, pass --model-config <local diffusers folder with the component configs>)"
    return CliError(f"cannot load model {source.spec}: {type(err).__name__}: {message}")


@dataclass
class LoadNotes:
    """Warnings of a successful load, to be printed once as ``warning:`` lines."""

    warnings: list[str] = field(default_factory=list)


def load_pipeline(
    source: ModelSource,
    *,
    device: str = "cpu",
    dtype: Any = None,
    scheduler: str | None = None,
    model_config: str | None = None,
    pipeline_class: str | None = None,
    notes: LoadNotes | None = None,
):
    """Load the pipeline ``source`` names, on ``device`` in ``dtype``, with the scheduler swapped if asked.

    The libraries' own log lines are held back; warnings that matter are returned in ``notes`` (diffusers'
    "fp16 cannot run on CPU", which is not true of current torch, is replaced by one line of ours)."""
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from qsilk.models.demo import QSilkDemoPipeline

    dtype = dtype or torch.float32
    notes = notes if notes is not None else LoadNotes()
    diffusers_logging.disable_progress_bar()  # our own progress display is the only one
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - class-conditional models need no transformers
        pass
    with _library_logs() as records:
        try:
            if source.kind in ("demo", "folder"):
                index = json.loads((Path(source.location) / "model_index.json").read_text())
                if index.get("_class_name") == QSilkDemoPipeline.__name__:
                    pipe = QSilkDemoPipeline.from_pretrained(source.location, dtype=dtype)
                else:
                    pipe = DiffusionPipeline.from_pretrained(source.location, dtype=dtype)
            elif source.kind == "single_file":
                cls = _single_file_class(source.location, model_config, pipeline_class)
                kwargs: dict[str, Any] = {"dtype": dtype}
                if model_config is not None:
                    kwargs["config"] = model_config
                pipe = cls.from_single_file(source.location, **kwargs)
            else:
                pipe = DiffusionPipeline.from_pretrained(source.location, dtype=dtype)
        except CliError:
            raise
        except Exception as err:
            raise _load_error(source, err, model_config) from None
        swap_scheduler(pipe, scheduler)
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(device)
    for record in records:
        message = record.getMessage()
        if _FP16_CPU_WARNING not in message:
            notes.warnings.append(one_line(message))
    if device == "cpu" and dtype == torch.float16:
        notes.warnings.append(
            "fp16 on CPU: it runs (current torch computes fp16 on CPU, whatever diffusers says), but several times "
            "slower than fp32 (5.6x measured on the demo model), and its images differ slightly from fp32 and from "
            "fp16 on a GPU; use --dtype fp32 on CPU"
        )
    return pipe


def check_scheduler_steps(scheduler, steps: int) -> None:
    """Run ``scheduler`` for ``steps`` steps on a tiny zero latent (a copy, no model): a scheduler that cannot take
    this many steps (PNDM with too few) fails here with one line, before any image is made."""
    import copy
    import inspect

    import torch

    trial = copy.deepcopy(scheduler)
    kwargs: dict[str, Any] = {}
    config = getattr(trial, "config", {})
    if config.get("use_dynamic_shifting") and "mu" in inspect.signature(trial.set_timesteps).parameters:
        kwargs["mu"] = 1.0  # flow pipelines pass their own shift; any value tells whether the step count works
    name = type(scheduler).__name__
    try:
        with torch.random.fork_rng(devices=[]):  # stochastic schedulers draw noise: leave the global RNG alone
            trial.set_timesteps(steps, **kwargs)
            sample = torch.zeros(1, 4, 8, 8)
            scale = getattr(trial, "scale_model_input", None)  # flow-matching schedulers have none
            for t in trial.timesteps:
                if scale is not None:
                    scale(sample, t)
                sample = trial.step(torch.zeros_like(sample), t, sample).prev_sample
    except Exception as err:
        raise CliError(
            f"{name} cannot run {steps} step(s) with this model's scheduler config: {type(err).__name__}: "
            f"{one_line(err)}; try more --steps or another --scheduler"
        ) from None


@dataclass(frozen=True)
class ModelPreview:
    """What a local diffusers folder says about itself without loading any weights."""

    pipeline: str
    conditioning: str | None  # "class", "text" or None (cannot tell)
    classes: dict[int, str]
    labels: dict[str, int]
    num_classes: int
    scheduler: Any  # the scheduler the run will use (after --scheduler), built from the folder's config


def preview_model(source: ModelSource, scheduler: str | None) -> ModelPreview | None:
    """Read ``model_index.json`` and the scheduler config of a local folder, so class names, the scheduler and
    the step count are checked before a model load that can take many seconds. None for other sources."""
    if source.kind not in ("demo", "folder"):
        return None
    import inspect

    import diffusers

    from qsilk.models.demo import QSilkDemoPipeline

    folder = Path(source.location)
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as err:
        raise CliError(f"cannot read {folder / 'model_index.json'}: {one_line(err)}") from None
    name = str(index.get("_class_name"))
    cls = QSilkDemoPipeline if name == QSilkDemoPipeline.__name__ else getattr(diffusers, name, None)
    params = inspect.signature(cls.__call__).parameters if isinstance(cls, type) else {}
    id2label = {int(k): str(v) for k, v in (index.get("id2label") or {}).items()}
    conditioning_kind = "class" if "class_labels" in params and id2label else "text" if "prompt" in params else None
    classes = {k: v.split(",")[0].strip() for k, v in sorted(id2label.items())}
    labels = {n.strip(): k for k, v in id2label.items() for n in v.split(",")}
    num = len(classes)
    transformer_config = folder / "transformer" / "config.json"
    if transformer_config.is_file():
        with contextlib.suppress(OSError, ValueError, TypeError):
            num = int(json.loads(transformer_config.read_text()).get("num_embeds_ada_norm") or num)
    sched = None
    scheduler_config = folder / "scheduler" / "scheduler_config.json"
    if scheduler_config.is_file():
        try:
            config = json.loads(scheduler_config.read_text())
            base = getattr(diffusers, str(config.get("_class_name")))
            sched = base.from_config(config)
        except Exception:  # an exotic scheduler: the real load will say what is wrong
            sched = None
        if sched is not None and scheduler is not None and type(sched).__name__ != scheduler:
            try:
                sched = getattr(diffusers, scheduler).from_config(sched.config)
            except Exception as err:
                raise CliError(f"cannot use scheduler {scheduler} with this model: {one_line(err)}") from None
    return ModelPreview(name, conditioning_kind, classes, labels, num, sched)


def check_qsilk_support(scheduler) -> None:
    """Fail before generating when QSilk cannot drive this scheduler (a pipeline's ``.scheduler``)."""
    from qsilk.sampling import UnsupportedSchedulerError, adapter_for

    try:
        adapter_for(scheduler)
    except (UnsupportedSchedulerError, TypeError, ValueError) as err:
        raise CliError(f"QSilk cannot run with {type(scheduler).__name__}: {one_line(err)}") from None


def conditioning(pipe) -> str:
    """"class" for class-conditional pipelines (the demo model, DiT), "text" for prompt-driven ones."""
    import inspect

    params = inspect.signature(pipe.__call__).parameters
    if "class_labels" in params and hasattr(pipe, "labels"):
        return "class"
    if "prompt" in params:
        return "text"
    raise CliError(f"{type(pipe).__name__} takes neither class labels nor a prompt; the CLI cannot drive it")


def class_table(pipe) -> dict[int, str]:
    """Class id -> display name (the first name listed for that id)."""
    id2label = dict(getattr(pipe.config, "id2label", None) or {})
    names: dict[int, str] = {int(k): str(v).split(",")[0].strip() for k, v in id2label.items()}
    for name, idx in getattr(pipe, "labels", {}).items():
        names.setdefault(int(idx), name)
    return dict(sorted(names.items()))


def num_classes(pipe) -> int:
    transformer = getattr(pipe, "transformer", None)
    value = getattr(getattr(transformer, "config", None), "num_embeds_ada_norm", None)
    return int(value) if value is not None else len(class_table(pipe))


def resolve_classes(pipe, values: list[str]) -> list[tuple[int, str]]:
    """``--class`` values (names, case-insensitive, or ids) -> (id, display name) pairs."""
    return resolve_class_names(class_table(pipe), getattr(pipe, "labels", {}), num_classes(pipe), values)


def resolve_class_names(
    table: dict[int, str], names: dict[str, int], total: int, values: list[str]
) -> list[tuple[int, str]]:
    """``resolve_classes`` from the tables alone (also used on a :class:`ModelPreview`, before loading)."""
    labels = {name.lower(): idx for name, idx in names.items()}
    out = []
    for value in values:
        text = value.strip()
        if re.fullmatch(r"\d+", text):
            idx = int(text)
            if not 0 <= idx < total:
                raise CliError(f"class id {idx} is out of range 0..{total - 1}")
        elif text.lower() in labels:
            idx = labels[text.lower()]
        else:
            shown = ", ".join(f"{i}={n}" for i, n in list(table.items())[:20])
            more = " ..." if len(table) > 20 else ""
            raise CliError(f"unknown class {value!r}; use a name or id ({shown}{more})")
        out.append((idx, table.get(idx, str(idx))))
    return out


def versions() -> dict[str, str]:
    """Versions that decide the bytes of an image."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import qsilk

    out = {"qsilk": qsilk.__version__, "python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
