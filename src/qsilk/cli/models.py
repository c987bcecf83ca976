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

import json
import os
import re
from dataclasses import dataclass
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
        except Exception as err:
            raise CliError(f"cannot read checkpoint {path}: {one_line(err)}") from None
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


def load_pipeline(
    source: ModelSource,
    *,
    device: str = "cpu",
    dtype: Any = None,
    scheduler: str | None = None,
    model_config: str | None = None,
    pipeline_class: str | None = None,
):
    """Load the pipeline ``source`` names, on ``device`` in ``dtype``, with the scheduler swapped if asked."""
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from qsilk.models.demo import QSilkDemoPipeline

    dtype = dtype or torch.float32
    diffusers_logging.disable_progress_bar()  # our own progress bar is the only one
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - class-conditional models need no transformers
        pass
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
        hint = ""
        if source.kind == "single_file" and model_config is None:
            hint = " (offline, pass --model-config <local diffusers folder with the component configs>)"
        raise CliError(f"cannot load model {source.spec}: {type(err).__name__}: {one_line(err)}{hint}") from None
    swap_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def check_qsilk_support(pipe) -> None:
    """Fail before generating when QSilk cannot drive this pipeline's scheduler."""
    from qsilk.sampling import UnsupportedSchedulerError, adapter_for

    try:
        adapter_for(pipe.scheduler)
    except (UnsupportedSchedulerError, TypeError, ValueError) as err:
        raise CliError(f"QSilk cannot run with {type(pipe.scheduler).__name__}: {one_line(err)}") from None


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
    table = class_table(pipe)
    labels = {name.lower(): idx for name, idx in getattr(pipe, "labels", {}).items()}
    total = num_classes(pipe)
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
