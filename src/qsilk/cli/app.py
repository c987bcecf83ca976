"""``qsilk`` command line: ``generate``, ``compare``, ``info``.

Every bad input ends in one line on stderr (``error: ...``) and exit code 2, before anything is written:
options are checked first, then what a local model folder says about itself (class names, scheduler, step count:
no weights read), then the model is loaded and the conditions are checked against it, and only then is the output
folder created. A run that fails later removes the folders it created while they are still empty.
Set ``QSILK_DEBUG=1`` to get tracebacks of unexpected errors.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x ships its own copy of click; older typer uses click itself
    from typer._click import exceptions as _click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as _click_exc

from .errors import CliError, one_line

DEBUG_ENV = "QSILK_DEBUG"
DEMO_CLASSES = ("T-shirt/top", "Trouser", "Dress", "Sneaker", "Bag")


def _error(message: object) -> None:
    typer.echo(f"error: {one_line(message)}", err=True)


class _OneLineErrors(TyperGroup):
    """Runs the command in click's non-standalone mode and reports every failure as one stderr line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = result if isinstance(result, int) else 0
        except _click_exc.NoArgsIsHelpError as err:
            typer.echo(err.ctx.get_help())
            code = 0
        except _click_exc.ClickException as err:  # option parsing: unknown option, wrong type, missing value
            _error(err.format_message())
            code = 2
        except typer.Exit as err:
            code = err.exit_code
        except typer.Abort:
            _error("aborted")
            code = 130
        except CliError as err:
            _error(err)
            code = err.exit_code
        except KeyboardInterrupt:
            _error("interrupted; finished images are kept, rerun the same command to resume")
            code = 130
        except Exception as err:
            if os.environ.get(DEBUG_ENV):
                raise
            _error(f"unexpected {type(err).__name__}: {one_line(err)} (set {DEBUG_ENV}=1 for the traceback)")
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=_OneLineErrors,
    name="qsilk",
    help="QSilk: micro-clamp + AQClip on the guided x0 of diffusion samplers. Generate, compare, inspect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        import qsilk

        typer.echo(f"qsilk {qsilk.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """QSilk: micro-clamp + AQClip on the guided x0 of diffusion samplers. Generate, compare, inspect."""


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code instead of exiting when given ``argv``."""
    command = typer.main.get_command(app)
    if argv is None:
        return command.main(prog_name="qsilk")
    return command.main(args=list(argv), prog_name="qsilk", standalone_mode=False)


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _warn(console, message: str) -> None:
    from .runs import say

    say(console, f"warning: {one_line(message)}")


# ---------------------------------------------------------------------------------------------- options

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", metavar="MODEL", help="'demo' (default), a diffusers folder, a .safetensors/.ckpt file, or a hub id."
    ),
]
ModelConfigOpt = Annotated[
    str | None,
    typer.Option(help="Single-file checkpoints: local diffusers folder (or hub id) with the component configs."),
]
PipelineClassOpt = Annotated[
    str | None, typer.Option(help="Single-file checkpoints: diffusers pipeline class (default: guessed).")
]
ClassOpt = Annotated[
    list[str] | None, typer.Option("--class", "-c", metavar="NAME|ID", help="Class name or id (class-conditional models); repeat.")
]
PromptOpt = Annotated[list[str] | None, typer.Option("--prompt", "-p", metavar="TEXT", help="Prompt (text models); repeat.")]
NegativeOpt = Annotated[str | None, typer.Option(help="Negative prompt (text models).")]
SchedulerOpt = Annotated[
    str | None,
    typer.Option(help="ddim, ddpm, euler, euler_a, heun, dpm, dpmpp_2m, unipc, or a diffusers class name."),
]
WidthOpt = Annotated[int | None, typer.Option(help="Image width (text models).")]
HeightOpt = Annotated[int | None, typer.Option(help="Image height (text models).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")]
DtypeOpt = Annotated[str, typer.Option(help="fp32, fp16 or bf16.")]
ThreadsOpt = Annotated[
    int | None, typer.Option(help="CPU threads for torch (default: 1 for the demo model on CPU, else torch's).")
]
QuantileOpt = Annotated[float | None, typer.Option(help="Micro-clamp tail quantile q (corridor [Q_q, Q_1-q]).")]
ModeOpt = Annotated[str | None, typer.Option(help="Micro-clamp mode: soft or hard.")]
TileOpt = Annotated[int | None, typer.Option(help="AQClip tile size (latent pixels).")]
StrideOpt = Annotated[int | None, typer.Option(help="AQClip tile stride (latent pixels).")]
KMinOpt = Annotated[float | None, typer.Option("--k-min", help="AQClip corridor half-width at confidence 0.")]
KMaxOpt = Annotated[float | None, typer.Option("--k-max", help="AQClip corridor half-width at confidence 1.")]
ConfidenceOpt = Annotated[str | None, typer.Option(help="AQClip confidence: structure, attention or none.")]
ClampOpt = Annotated[bool | None, typer.Option("--clamp/--no-clamp", help="Micro-clamp on/off.")]
AQClipOpt = Annotated[bool | None, typer.Option("--aqclip/--no-aqclip", help="AQClip on/off.")]


def _preset_help() -> str:
    from qsilk import QSilkConfig

    names = getattr(QSilkConfig, "preset_names", None)
    return ", ".join(names()) if names else "default, strong"


@dataclass(frozen=True)
class _Request:
    classes: list[str]
    prompts: list[str]
    negative_prompt: str | None
    width: int | None
    default_classes: bool


def _conditions(kind: str, pipeline: str, table: dict[int, str], labels: dict[str, int], total: int, request: _Request):
    """The run's conditions, checked against what the model takes (a loaded pipeline or a folder preview)."""
    from . import models, runs

    classes = request.classes
    if kind == "class":
        if request.prompts or request.negative_prompt:
            raise CliError(f"{pipeline} is class-conditional: use --class, not --prompt")
        if request.width is not None:
            raise CliError("--width/--height apply to text-to-image models only")
        if not classes:
            names = [n for n in DEMO_CLASSES if n in labels] if request.default_classes else []
            classes = names or [str(i) for i in list(table)[: (5 if request.default_classes else 16)]]
        pairs = models.resolve_class_names(table, labels, total, classes)
        return [runs.Condition(class_id=i, class_name=n) for i, n in pairs]
    if classes:
        raise CliError(f"{pipeline} is a text-to-image model: use --prompt, not --class")
    if not request.prompts:
        raise CliError(f"{pipeline} is a text-to-image model: give at least one --prompt")
    return [runs.Condition(prompt=p, negative_prompt=request.negative_prompt) for p in request.prompts]


@dataclass
class _Prepared:
    pipe: Any
    settings: Any
    conditions: list
    seeds: list[int]
    versions: dict[str, str]


def _prepare(
    *,
    model,
    model_config,
    pipeline_class,
    classes,
    prompts,
    negative_prompt,
    seeds,
    steps,
    cfg,
    scheduler,
    width,
    height,
    device,
    dtype,
    out: Path,
    default_classes: bool,
    uses_qsilk: bool,
    threads: int | None = None,
    validate_more=None,
    console=None,
) -> _Prepared:
    """Everything before the first image: check options, load the model, check conditions against it."""
    from . import models, options, runs

    seed_list = runs.parse_seeds(seeds)
    options.check_steps(steps)
    if cfg is not None:
        options.check_cfg(cfg)
    width, height = options.check_size(width, height)
    prompt_list = options.check_prompts(prompts or [])
    if classes and prompt_list:
        raise CliError("give --class (class-conditional models) or --prompt (text models), not both")
    if threads is not None and threads < 1:
        raise CliError(f"--threads must be >= 1, got {threads}")
    if validate_more is not None:
        validate_more()
    scheduler_class = models.resolve_scheduler(scheduler)
    device_name = models.resolve_device(device)
    torch_dtype = models.resolve_dtype(dtype)
    source = models.resolve_model(model)
    if model_config is not None and source.kind != "single_file":
        raise CliError("--model-config applies to single-file checkpoints only")
    if model_config is not None:
        folder = Path(model_config).expanduser()
        if folder.exists() and not (folder / "model_index.json").is_file():
            raise CliError(f"--model-config {model_config} is not a diffusers pipeline folder (no model_index.json)")
        if not folder.exists() and model_config.startswith(("/", ".", "~")):
            raise CliError(f"--model-config folder {model_config} does not exist")
    runs.ensure_writable_dir(out)
    request = _Request(classes or [], prompt_list, negative_prompt, width, default_classes)
    preview = models.preview_model(source, scheduler_class)
    if preview is not None:  # a local folder: check what it can tell without loading weights
        if preview.conditioning is not None:
            _conditions(preview.conditioning, preview.pipeline, preview.classes, preview.labels,
                        preview.num_classes, request)  # fmt: skip
        if preview.scheduler is not None:
            if uses_qsilk:
                models.check_qsilk_support(preview.scheduler)
            models.check_scheduler_steps(preview.scheduler, steps)

    if threads is None and source.kind == "demo" and device_name == "cpu":
        # The demo model's ops are too small to gain from intra-op threads, and on a busy machine oversubscribed
        # threads cost ~10x (measured: 20 compare images in 10 s with 1 thread, 112 s with 2 beside a training job).
        threads = 1
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    notes = models.LoadNotes()
    pipe = models.load_pipeline(
        source,
        device=device_name,
        dtype=torch_dtype,
        scheduler=scheduler_class,
        model_config=model_config,
        pipeline_class=pipeline_class,
        notes=notes,
    )
    for message in notes.warnings:
        _warn(console, message)
    if uses_qsilk:
        models.check_qsilk_support(pipe.scheduler)
    if preview is None or preview.scheduler is None:
        models.check_scheduler_steps(pipe.scheduler, steps)
    kind = models.conditioning(pipe)
    conditions = _conditions(kind, type(pipe).__name__, models.class_table(pipe), getattr(pipe, "labels", {}),
                             models.num_classes(pipe), request)  # fmt: skip
    if cfg is None:
        cfg = 4.0 if kind == "class" else 7.5
    scheduler_name, scheduler_config = runs.scheduler_record(pipe)
    settings = runs.Settings(
        model=source.record(),
        pipeline=type(pipe).__name__,
        steps=steps,
        cfg=float(cfg),
        scheduler=scheduler_name,
        scheduler_config=scheduler_config,
        device=device_name,
        dtype=dtype.lower(),
        width=width,
        height=height,
    )
    return _Prepared(pipe, settings, conditions, seed_list, models.versions())


def _check_qrm(spec: str) -> None:
    """``--qrm`` checked before any model is loaded: 'demo' or an existing QRM checkpoint."""
    from qsilk.qrm.cli import check_qrm_option

    try:
        check_qrm_option(spec)
    except (ValueError, OSError) as e:
        raise CliError(str(e)) from None


def _attach_qrm(prepared: _Prepared, spec: str) -> None:
    """Attach the ``--qrm`` QRM to the loaded pipeline; its record goes into every image's settings."""
    import dataclasses

    from qsilk.qrm.cli import attach_qrm_option

    try:
        prepared.settings = dataclasses.replace(prepared.settings, qrm=attach_qrm_option(prepared.pipe, spec))
    except (ValueError, TypeError, OSError) as e:
        raise CliError(f"--qrm: {e}") from None


# ---------------------------------------------------------------------------------------------- commands


@app.command(short_help="Generate images (QSilk on by default); each PNG records how to reproduce it.")
def generate(
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    pipeline_class: PipelineClassOpt = None,
    classes: ClassOpt = None,
    prompts: PromptOpt = None,
    negative_prompt: NegativeOpt = None,
    seeds: Annotated[list[str] | None, typer.Option("--seed", "-s", metavar="SEEDS", help="Seed, range (0-7) or list; repeat.")] = None,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 20,
    cfg: Annotated[float | None, typer.Option(help="Guidance scale (default 4 for class, 7.5 for text models).")] = None,
    scheduler: SchedulerOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    use_qsilk: Annotated[bool, typer.Option("--qsilk/--no-qsilk", help="Apply QSilk (default on).")] = True,
    preset: Annotated[
        str | None, typer.Option(metavar="NAME", help=f"Named QSilk config to start from ({_preset_help()}).")
    ] = None,
    config: Annotated[str | None, typer.Option(metavar="FILE|JSON", help="QSilk config: JSON file or inline JSON; overrides the preset, flags override it.")] = None,
    quantile: QuantileOpt = None,
    mode: ModeOpt = None,
    tile: TileOpt = None,
    stride: StrideOpt = None,
    k_min: KMinOpt = None,
    k_max: KMaxOpt = None,
    confidence: ConfidenceOpt = None,
    clamp: ClampOpt = None,
    aqclip: AQClipOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("qsilk-out"),
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    threads: ThreadsOpt = None,
    qrm: Annotated[
        str | None,
        typer.Option("--qrm", metavar="PATH|demo", help="Attach a QRM ('demo': the shipped one for the demo model)."),
    ] = None,
) -> None:
    """Generate images; each PNG carries its reproduction record (PNG text 'qsilk') and a JSON sidecar."""
    from . import options, runs

    flags = dict(
        quantile=quantile, mode=mode, tile=tile, stride=stride, k_min=k_min, k_max=k_max,
        confidence=confidence, clamp=clamp, aqclip=aqclip,
    )  # fmt: skip
    qsilk_config: dict[str, Any] | None = None

    def check_qsilk() -> None:
        nonlocal qsilk_config
        given = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]
        given += [name for name, v in (("--preset", preset), ("--config", config)) if v is not None]
        if not use_qsilk and given:
            raise CliError(f"QSilk options ({', '.join(given)}) given with --no-qsilk")
        qsilk_config = options.build_config(config, flags, preset=preset) if use_qsilk else None
        if qrm is not None:
            _check_qrm(qrm)

    console = _console()
    prepared = _prepare(
        model=model, model_config=model_config, pipeline_class=pipeline_class, classes=classes, prompts=prompts,
        negative_prompt=negative_prompt, seeds=seeds or ["0"], steps=steps, cfg=cfg, scheduler=scheduler,
        width=width, height=height, device=device, dtype=dtype, out=out, default_classes=False,
        uses_qsilk=use_qsilk, threads=threads, validate_more=check_qsilk, console=console,
    )  # fmt: skip
    if qrm is not None:
        _attach_qrm(prepared, qrm)
    jobs = [runs.Job(c, s, qsilk_config) for c in prepared.conditions for s in prepared.seeds]
    with runs.output_folder(out):
        results = runs.run_jobs(prepared.pipe, prepared.settings, jobs, out, versions=prepared.versions, console=console)
    made = sum(not r.skipped for r in results)
    typer.echo(f"{made} image(s) written, {len(results) - made} already done, in {out}")


@app.command(short_help="Same seeds without and with QSilk (and presets/configs): images, maps, index.html.")
def compare(
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    pipeline_class: PipelineClassOpt = None,
    classes: ClassOpt = None,
    prompts: PromptOpt = None,
    negative_prompt: NegativeOpt = None,
    seeds: Annotated[list[str] | None, typer.Option("--seed", "-s", metavar="SEEDS", help="Seeds (default 0-1); repeat.")] = None,
    steps: Annotated[int, typer.Option(help="Sampling steps (few: where QSilk matters).")] = 8,
    cfg: Annotated[float, typer.Option(help="Guidance scale (high: where QSilk matters).")] = 7.0,
    scheduler: SchedulerOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    presets: Annotated[
        list[str] | None,
        typer.Option("--preset", metavar="NAME", help=f"Extra column with a named QSilk config ({_preset_help()}); repeat."),
    ] = None,
    configs: Annotated[
        list[str] | None, typer.Option("--config", metavar="FILE|JSON", help="Extra QSilk config column (JSON file or inline); repeat.")
    ] = None,
    quantile: QuantileOpt = None,
    mode: ModeOpt = None,
    tile: TileOpt = None,
    stride: StrideOpt = None,
    k_min: KMinOpt = None,
    k_max: KMaxOpt = None,
    confidence: ConfidenceOpt = None,
    clamp: ClampOpt = None,
    aqclip: AQClipOpt = None,
    sample: Annotated[int, typer.Option(help="Row whose per-step maps are drawn.")] = 0,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("qsilk-demo"),
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    threads: ThreadsOpt = None,
    qrm: Annotated[
        str | None,
        typer.Option(
            "--qrm", metavar="PATH|demo",
            help="Add a 'qrm' column and a QRM variant of each QSilk column ('demo': the shipped demo-model QRM).",
        ),
    ] = None,
) -> None:
    """Same seeds without and with QSilk (and extra configs): grid, difference heat map, per-step maps and
    statistics, and an index.html that shows it all."""
    from . import compare as comparison
    from . import options, runs

    flags = dict(
        quantile=quantile, mode=mode, tile=tile, stride=stride, k_min=k_min, k_max=k_max,
        confidence=confidence, clamp=clamp, aqclip=aqclip,
    )  # fmt: skip
    columns: list[comparison.Column] = []

    def check_columns() -> None:
        default = options.build_config(None, flags)
        named: list[tuple[str, dict[str, Any] | None]] = [("plain", None)]
        named.append(("qsilk defaults" if default == options.default_config() else f"qsilk {options.describe(default)}", default))
        for name in presets or []:
            named.append((name, options.build_config(None, {}, preset=name)))
        for source in configs or []:
            built = options.build_config(source, {})
            named.append((options.config_label(source, built), built))
        if qrm is not None:
            _check_qrm(qrm)
            named += [("qrm", None, True)] + [(f"qrm + {label}", config, True) for label, config in named[1:]]
        columns.extend(comparison.make_columns(named))
        if sample < 0:
            raise CliError(f"--sample must be >= 0, got {sample}")

    console = _console()
    prepared = _prepare(
        model=model, model_config=model_config, pipeline_class=pipeline_class, classes=classes, prompts=prompts,
        negative_prompt=negative_prompt, seeds=seeds or ["0-1"], steps=steps, cfg=cfg, scheduler=scheduler,
        width=width, height=height, device=device, dtype=dtype, out=out, default_classes=True,
        uses_qsilk=True, threads=threads, validate_more=check_columns, console=console,
    )  # fmt: skip
    rows = [(c, s) for c in prepared.conditions for s in prepared.seeds]
    if sample >= len(rows):
        raise CliError(f"--sample {sample} is out of range: there are {len(rows)} rows")
    if qrm is not None:
        _attach_qrm(prepared, qrm)
    jobs = [
        runs.Job(c, s, col.config, folder=f"images/{col.folder}", qrm=col.qrm) for col in columns for c, s in rows
    ]
    with runs.output_folder(out):
        results = runs.run_jobs(
            prepared.pipe, prepared.settings, jobs, out, versions=prepared.versions, record_maps=True,
            measure_plain=True, warmup=True, console=console,
        )  # fmt: skip
        page = comparison.write_report(results, columns, rows, prepared.settings, prepared.versions, out, sample=sample)
    typer.echo(f"comparison written to {page}")


@app.command(short_help="Versions, devices, and the demo model (where it is, its classes).")
def info(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Versions, device, and the demo model (where it is, whether its weights are present)."""
    from . import models

    report = _info_report(models)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    versions = report["versions"]
    typer.echo("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    dev = report["device"]
    cuda = f"yes ({', '.join(dev['cuda_devices'])})" if dev["cuda_available"] else "no"
    typer.echo(f"device: cuda available: {cuda}; mps available: {'yes' if dev['mps_available'] else 'no'}; "
               f"cpu threads: {dev['cpu_threads']}")  # fmt: skip
    demo = report["demo_model"]
    typer.echo(f"demo model: {demo['folder']}" + (f" (from ${models.DEMO_ENV})" if demo["from_env"] else ""))
    if not demo["present"]:
        typer.echo("  weights: not installed (train and export them with scripts/train_demo.sh)")
        return
    typer.echo(f"  weights: present, {demo['size_bytes'] / 1e6:.1f} MB, {demo['parameters']:,} parameters")
    typer.echo(f"  pipeline: {demo['pipeline']}, scheduler {demo['scheduler']}")
    typer.echo(f"  classes ({len(demo['classes'])}): " + ", ".join(f"{k}={v}" for k, v in demo["classes"].items()))
    if demo.get("export"):
        fields = (f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in demo["export"].items() if not isinstance(v, dict))
        typer.echo("  export: " + ", ".join(fields))


def _info_report(models) -> dict[str, Any]:
    import torch

    folder = models.demo_model_dir()
    index_path = folder / "model_index.json"
    demo: dict[str, Any] = {
        "folder": str(folder),
        "from_env": bool(os.environ.get(models.DEMO_ENV)),
        "present": index_path.is_file(),
    }
    if demo["present"]:
        index = json.loads(index_path.read_text())
        files = [p for p in folder.rglob("*") if p.is_file()]
        demo["size_bytes"] = sum(p.stat().st_size for p in files)
        demo["parameters"] = _count_parameters(files)
        demo["pipeline"] = index.get("_class_name")
        demo["scheduler"] = (index.get("scheduler") or [None, None])[1]
        demo["classes"] = {str(k): v for k, v in (index.get("id2label") or {}).items()}
        export = folder / "export.json"
        if export.is_file():
            try:
                demo["export"] = json.loads(export.read_text())
            except ValueError:
                demo["export"] = None
    return {
        "versions": models.versions(),
        "device": {
            "cuda_available": torch.cuda.is_available(),
            "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "mps_available": bool(torch.backends.mps.is_available()),
            "cpu_threads": torch.get_num_threads(),
        },
        "demo_model": demo,
    }


def _count_parameters(files: list[Path]) -> int:
    """Parameter count from safetensors headers alone (no tensor is read)."""
    from math import prod

    from safetensors import safe_open

    total = 0
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    total += prod(f.get_slice(key).get_shape())
    return total


# `qsilk study` lives in qsilk.study (its own parser; forwarded unchanged).
from qsilk.study.cli import register as _register_study  # noqa: E402

_register_study(app)

# `qsilk train-qrm` lives in qsilk.qrm (its own parser; forwarded unchanged).
from qsilk.qrm.cli import register as _register_train_qrm  # noqa: E402

_register_train_qrm(app)
