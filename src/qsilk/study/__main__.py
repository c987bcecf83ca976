"""``python -m qsilk.study`` / ``accelerate launch -m qsilk.study`` / ``qsilk study``: run (or resume) a study.

    python -m qsilk.study --out runs/corner --methods cfg-rescale fdg qsilk fdg+qsilk --steps 4 8 --cfg 6 9 --n 500
    accelerate launch --multi_gpu --num_processes 2 -m qsilk.study --out runs/corner ...   # two processes (CPU too), same numbers
    python -m qsilk.study --out runs/corner --spec study.json                        # several blocks, from JSON
    python -m qsilk.study --out runs/corner --report-only                            # rewrite results and report

Rerunning the same command resumes: finished chunks are kept, missing ones are computed. Methods: ``--list``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEBUG_ENV = "QSILK_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qsilk study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, help="study folder (created; resumed when it exists)")
    p.add_argument("--spec", help="study spec JSON (file or text); the options below override its fields")
    p.add_argument("--methods", nargs="+", help="methods (plain CFG is always added); see --list")
    p.add_argument("--steps", nargs="+", type=int)
    p.add_argument("--cfg", nargs="+", type=float)
    p.add_argument("--schedulers", nargs="+", help="scheduler short names (default: dpm)")
    p.add_argument("--n", type=int, help="paired samples per cell")
    p.add_argument("--seed-base", type=int, help="first seed (tuning and report sets: disjoint ranges)")
    p.add_argument("--chunk", type=int, help="samples per stored chunk (the resume granularity)")
    p.add_argument("--metrics", nargs="+", help="qsilk.eval.metrics names or module:attr")
    p.add_argument("--model", help="demo pipeline folder (default: the embedded demo model)")
    p.add_argument("--ref-split", help="Fashion-MNIST split of the reference images (default: test)")
    p.add_argument("--ref-n", type=int, help="reference images")
    p.add_argument("--bootstrap", type=int, help="bootstrap replicates")
    p.add_argument("--ci", type=float, help="interval level (default 0.95)")
    p.add_argument("--threads", type=int, help="torch threads per process (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.add_argument("--report-only", action="store_true", help="only (re)write results and report from the folder")
    p.add_argument("--no-report", action="store_true", help="write results.json/.csv but no HTML report")
    p.add_argument("--list", action="store_true", help="list the method parts and exit")
    p.add_argument("--table", nargs="*", metavar="KEY",
                   help="print Markdown tables of <out>/results.json (headline keys, or these) and exit")  # fmt: skip
    return p


FIELDS = {
    "n": "n", "seed_base": "seed_base", "chunk": "chunk", "metrics": "metrics", "model": "model",
    "ref_split": "ref_split", "ref_n": "ref_n", "bootstrap": "bootstrap", "ci": "ci", "threads": "threads",
}  # fmt: skip


def spec_from_args(args: argparse.Namespace):
    from .grid import StudySpec

    data: dict = {}
    if args.spec:
        text = args.spec
        if not text.lstrip().startswith("{"):
            try:
                text = Path(text).read_text()
            except OSError as err:
                raise ValueError(f"cannot read study spec {args.spec}: {err.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"malformed study spec JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError("a study spec must be a JSON object")
    elif args.out is not None and (args.out / "spec.json").exists() and not any((args.methods, args.steps, args.cfg)):
        data = json.loads((args.out / "spec.json").read_text())  # plain resume: `--out DIR` alone
    for arg, name in FIELDS.items():
        value = getattr(args, arg)
        if value is not None:
            data[name] = value
    if any(v is not None for v in (args.methods, args.steps, args.cfg)):
        missing = [k for k in ("methods", "steps", "cfg") if getattr(args, k) is None]
        if missing:
            raise ValueError(f"a grid from the command line needs --{', --'.join(missing)} too")
        block = {"methods": args.methods, "steps": args.steps, "cfg": args.cfg}
        if args.schedulers:
            block["schedulers"] = args.schedulers
        data["blocks"] = [*data.get("blocks", []), block] if args.spec else [block]
    if not data.get("blocks"):
        raise ValueError("no grid: give --methods/--steps/--cfg, or --spec with blocks, or --out of an existing study")
    return StudySpec.from_dict(data)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        if args.list:
            from .methods import PARTS

            for part in PARTS.values():
                print(f"{part.name:16s} {part.kind:9s} {part.summary}")
            print("compose parts with '+', e.g. fdg+qsilk (at most one part per kind)")
            return 0
        if args.out is None:
            raise ValueError("--out is required")
        if args.table is not None:
            from .report import HEADLINE, markdown

            path = args.out / "results.json"
            if not path.exists():
                raise ValueError(f"no results at {path}")
            print(markdown(json.loads(path.read_text()), tuple(args.table) or HEADLINE))
            return 0
        spec = spec_from_args(args)
        from .report import write_outputs
        from .runner import Study

        study = Study(spec, args.out, progress=not args.no_progress)
        if args.report_only:
            if not (args.out / "spec.json").exists():
                raise ValueError(f"no study at {args.out}")
            study._check_folder()
            study._bootstrap_units()  # cells finished since the last results (safe next to a running study)
            writer = True
        else:
            writer = study.run()
        if writer:
            results = write_outputs(study, report=not args.no_report)
            done = len(results["cells"])
            where = args.out / ("results.json" if args.no_report else "report/index.html")
            print(f"study: {done} cells done, {len(results['incomplete'])} incomplete; {where}")
        return 0
    except (ValueError, FileNotFoundError, ImportError) as err:
        if os.environ.get(DEBUG_ENV):
            raise
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; finished chunks are kept, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
