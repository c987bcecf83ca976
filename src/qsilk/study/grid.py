"""What a study measures: :class:`StudySpec` (JSON round-trip) and its cells.

A cell is (scheduler, steps, CFG, method). Sample i of every cell uses seed ``seed_base + i`` and class
``i mod num_classes``, so all methods of a study see the same noise and classes (paired samples). The grid is a
union of blocks, each a product methods x steps x CFG x schedulers (e.g. every method at the corner, a few at
every cell); plain CFG (``"cfg"``) is always added to every block: it is what every difference is taken against.

The *fixed* part of a spec (model, first seed, chunk, reference, bootstrap) decides every stored number; a study
folder refuses a spec whose fixed part differs. Blocks, metrics and n may grow between runs (new cells, metrics and
seed chunks are added, finished ones are kept; use an n that is a multiple of the chunk so chunks stay whole).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .methods import BASELINE, get_method

FIXED_FIELDS = ("model", "seed_base", "chunk", "ref_split", "ref_n", "bootstrap", "bootstrap_seed")


@dataclass(frozen=True)
class Cell:
    scheduler: str
    steps: int
    cfg: float
    method: str

    @property
    def key(self) -> str:
        """Folder-safe, unique, human-readable: ``dpm-s8-cfg6-fdg+qsilk``."""
        return f"{self.scheduler}-s{self.steps}-cfg{self.cfg:g}-{self.method}"

    @property
    def group(self) -> tuple[str, int, float]:
        """The cells compared with each other (same scheduler, steps and CFG)."""
        return (self.scheduler, self.steps, self.cfg)

    def baseline(self) -> Cell:
        return dataclasses.replace(self, method=BASELINE)


@dataclass(frozen=True)
class Block:
    methods: tuple[str, ...]
    steps: tuple[int, ...]
    cfg: tuple[float, ...]
    schedulers: tuple[str, ...] = ("dpm",)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Block:
        unknown = sorted(set(data) - {"methods", "steps", "cfg", "schedulers"})
        if unknown:
            raise ValueError(f"unknown grid block key(s) {unknown}; known: methods, steps, cfg, schedulers")
        try:
            block = cls(
                methods=tuple(str(m) for m in data["methods"]),
                steps=tuple(int(s) for s in data["steps"]),
                cfg=tuple(float(c) for c in data["cfg"]),
                schedulers=tuple(str(s) for s in data.get("schedulers", ("dpm",))),
            )
        except KeyError as err:
            raise ValueError(f"a grid block needs {err.args[0]!r}") from None
        except (TypeError, ValueError) as err:
            raise ValueError(f"invalid grid block {data!r}: {err}") from None
        block.validate()
        return block

    def validate(self) -> None:
        if not (self.methods and self.steps and self.cfg and self.schedulers):
            raise ValueError("a grid block needs at least one method, step count, CFG scale and scheduler")
        for name in self.methods:
            get_method(name)  # raises with the list of known parts
        if any(s < 1 for s in self.steps):
            raise ValueError(f"steps must be >= 1, got {list(self.steps)}")
        if any(not c >= 0 for c in self.cfg):
            raise ValueError(f"CFG scales must be >= 0, got {list(self.cfg)}")
        for s in self.schedulers:
            if not re.fullmatch(r"[A-Za-z0-9_]+", s):
                raise ValueError(f"scheduler names are identifiers (e.g. dpm, ddim, euler), got {s!r}")

    def to_dict(self) -> dict[str, list]:
        return {k: list(v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class StudySpec:
    blocks: list[Block]
    n: int = 100
    seed_base: int = 0
    chunk: int = 25
    metrics: tuple[str, ...] = ("inception", "fmnist", "spectral", "saturation")
    model: str | None = None  # None: the embedded demo model
    ref_split: str = "test"
    ref_n: int = 10000
    bootstrap: int = 300
    bootstrap_seed: int = 0
    ci: float = 0.95
    threads: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.metrics = tuple(self.metrics)
        if not self.blocks:
            raise ValueError("a study needs at least one grid block")
        for block in self.blocks:
            block.validate()
        if self.n < 2 or self.chunk < 1 or self.ref_n < 2:
            raise ValueError(f"need n >= 2, chunk >= 1, ref_n >= 2; got n={self.n}, chunk={self.chunk}, ref_n={self.ref_n}")
        if self.seed_base < 0:
            raise ValueError(f"seed_base must be >= 0, got {self.seed_base}")
        if not self.metrics:
            raise ValueError("a study needs at least one metric")
        if self.bootstrap < 1 or not 0 < self.ci < 1:
            raise ValueError(f"need bootstrap >= 1 and 0 < ci < 1, got {self.bootstrap}, {self.ci}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    def cells(self) -> list[Cell]:
        """Every cell once, in a fixed order (scheduler, steps, CFG, then methods as listed, baseline first)."""
        seen: dict[Cell, None] = {}
        for block in self.blocks:
            methods = [BASELINE, *(get_method(m).name for m in block.methods)]
            for scheduler in block.schedulers:
                for steps in block.steps:
                    for cfg in block.cfg:
                        for method in methods:
                            seen.setdefault(Cell(scheduler, steps, cfg, method), None)
        return sorted(seen, key=lambda c: (c.scheduler, c.steps, c.cfg, c.method != BASELINE))

    def chunks(self) -> list[tuple[int, int]]:
        return [(start, min(self.chunk, self.n - start)) for start in range(0, self.n, self.chunk)]

    def fixed(self) -> dict[str, Any]:
        data = self.to_dict()
        return {k: data[k] for k in FIXED_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["blocks"] = [b.to_dict() for b in self.blocks]
        out["metrics"] = list(self.metrics)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudySpec:
        if not isinstance(data, dict):
            raise ValueError("a study spec must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown study spec key(s) {unknown}; known: {sorted(known)}")
        data = dict(data)
        data["blocks"] = [Block.from_dict(b) for b in data.get("blocks", [])]
        try:
            return cls(**data)
        except TypeError as err:
            raise ValueError(f"invalid study spec: {err}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> StudySpec:
        text = str(text_or_path)
        if isinstance(text_or_path, Path) or not text.lstrip().startswith("{"):
            try:
                text = Path(text_or_path).read_text()
            except OSError as err:
                raise ValueError(f"cannot read study spec {text_or_path}: {err.strerror}") from None
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as err:
            raise ValueError(f"malformed study spec JSON: {err}") from None


__all__ = ["Block", "Cell", "FIXED_FIELDS", "StudySpec"]
