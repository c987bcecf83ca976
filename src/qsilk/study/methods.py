"""The methods a study compares, by name: plain CFG, diffusers' guiders, thresholding baselines, the reference QSilk
formulas and QSilk variants, and compositions ``"guider+qsilk-variant"``.

A name is one or more registered parts joined by ``+`` (at most one part of each kind: guider, scheduler change,
x0 operator, QSilk config), e.g. ``"fdg+qsilk"`` or ``"cfg-rescale+qsilk-strong"``. ``method_names()`` lists the
parts; ``get_method(name)`` builds a :class:`Method`, whose ``sampling(pipe, cfg)`` context manager installs it on
a demo pipeline and yields the keyword arguments of the pipeline call. ``Method.record(cfg)`` is the JSON that
reproduces it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from qsilk.config import QSilkConfig

BASELINE = "cfg"
KINDS = ("guider", "scheduler", "x0", "corridor", "qsilk", "qrm")


@dataclass(frozen=True)
class Part:
    """One registered piece of a method. ``build`` maps the cell's CFG scale to the piece (a guider, a scheduler
    transform, an x0 operator or a QSilk config); ``params`` is its JSON record."""

    kind: str
    name: str
    summary: str
    build: Callable[[float], Any]
    params: Callable[[float], dict] = field(default=lambda cfg: {})


def _guider_record(guider) -> dict:
    if hasattr(guider, "to_dict"):
        return guider.to_dict()
    config = {k: v for k, v in dict(guider.config).items() if not k.startswith("_")}
    return {"class": type(guider).__name__, **config}


def _cfg(**extra) -> Callable[[float], Any]:
    def build(cfg: float):
        from diffusers.guiders import ClassifierFreeGuidance

        return ClassifierFreeGuidance(guidance_scale=cfg, **extra)

    return build


def _apg(cfg: float):
    from diffusers.guiders import AdaptiveProjectedGuidance

    return AdaptiveProjectedGuidance(guidance_scale=cfg, eta=0.0)


def _zero_star(cfg: float):
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    return ClassifierFreeZeroStarGuidance(guidance_scale=cfg)


def _fdg(cfg: float):
    from diffusers.guiders import FrequencyDecoupledGuidance

    # High band at the CFG scale, low band at half of it (never below 1: that would extrapolate towards uncond).
    return FrequencyDecoupledGuidance(guidance_scales=[float(cfg), max(1.0, cfg / 2)])


def _tcfg(cfg: float):
    from diffusers.guiders import TangentialClassifierFreeGuidance

    return TangentialClassifierFreeGuidance(guidance_scale=cfg)


def _mimic(cfg: float):
    from qsilk.baselines import MimicScaleGuidance

    return MimicScaleGuidance(guidance_scale=cfg, mimic_scale=3.0, percentile=0.995, phi=1.0)


def _imagen(cfg: float):
    from qsilk.baselines import imagen_thresholding

    return lambda scheduler: imagen_thresholding(scheduler, ratio=0.995)


def _ref_clamp(cfg: float):
    from qsilk.eval.reference import reference_micro_clamp

    return lambda x0: reference_micro_clamp(x0, quantile=0.001)


def _ref_aqclip(cfg: float):
    from qsilk.eval.reference import reference_aqclip

    # The reference's 32/16 tiles are wider than the 16x16 demo latent (no tile would fit): half the latent, stride
    # half a tile, as 32/16 is for a 64x64 SD latent.
    def op(x0):
        tile = max(2, min(x0.shape[-2:]) // 2)
        return reference_aqclip(x0, tile=tile, stride=max(1, tile // 2))

    return op


def _cond_corridor(**params) -> Callable[[float], dict]:
    # the ConditionalCorridorGuidance arguments; the guider it wraps comes from the method's guider part
    return lambda cfg: {"k": 2.5, "tile": "auto", "stride": "auto", **params}


def _qsilk(**changes) -> Callable[[float], QSilkConfig]:
    return lambda cfg: QSilkConfig().replace(**changes)


_STRONG = {"clamp_quantile": 0.01, "aqclip_k_min": 1.5, "aqclip_k_max": 3.0}
_AUTO = {"aqclip_tile": "auto", "aqclip_stride": "auto"}


def _demo_qrm(cfg: float):
    from qsilk.qrm import demo_qrm_path

    return demo_qrm_path()


def _demo_qrm_record(cfg: float) -> dict:
    import hashlib

    path = _demo_qrm(cfg)
    return {"checkpoint": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:12]}


def _guider_part(name: str, summary: str, build) -> Part:
    return Part("guider", name, summary, build, lambda cfg: _guider_record(build(cfg)))


def _qsilk_part(name: str, summary: str, build) -> Part:
    return Part("qsilk", name, summary, build, lambda cfg: build(cfg).to_dict())


PARTS: dict[str, Part] = {
    p.name: p
    for p in [
        Part("guider", "cfg", "plain CFG of the pipeline itself (the baseline)", lambda cfg: None),
        _guider_part("cfg-guider", "diffusers ClassifierFreeGuidance (same as cfg)", _cfg()),
        _guider_part("cfg-rescale", "CFG-Rescale, guidance_rescale=0.7", _cfg(guidance_rescale=0.7)),
        _guider_part("interval", "guidance interval: CFG only in steps [25 %, 75 %)", _cfg(start=0.25, stop=0.75)),
        _guider_part("apg", "AdaptiveProjectedGuidance, eta=0 (no parallel part)", _apg),
        _guider_part("cfg-zero-star", "ClassifierFreeZeroStarGuidance (first step zeroed)", _zero_star),
        _guider_part("fdg", "FrequencyDecoupledGuidance, scales [w, max(1, w/2)] (high, low)", _fdg),
        _guider_part("tcfg", "TangentialClassifierFreeGuidance", _tcfg),
        _guider_part("mimic-dt", "latent dynamic thresholding, mimic scale 3, p=0.995 (x0 space)", _mimic),
        Part(
            "scheduler",
            "imagen-dt",
            "Imagen dynamic thresholding: the scheduler's thresholding=True, ratio 0.995",
            _imagen,
            lambda cfg: {"thresholding": True, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1e4},
        ),
        Part("x0", "ref-clamp", "reference hard clamp q=0.001 on the guided x0 per step", _ref_clamp,
             lambda cfg: {"operator": "reference_micro_clamp", "quantile": 0.001}),  # fmt: skip
        Part("x0", "ref-aqclip", "published AQClip (reference formulas) on the guided x0 per step", _ref_aqclip,
             lambda cfg: {"operator": "reference_aqclip", "tile": "latent/2", "stride": "tile/2"}),  # fmt: skip
        # issue 8 item 4: the corridor sized by the conditional x0's per-tile spread (a guider wrapper, qsilk.guidance)
        *(
            Part("corridor", name, summary, build, build)
            for name, summary, build in [
                ("cond-corridor", "guided x0 into tile mean +- 2.5 x the cond x0's tile std (auto tiles)",
                 _cond_corridor()),
                ("cond-corridor-k1.5", "cond-corridor with k = 1.5", _cond_corridor(k=1.5)),
                ("cond-corridor-k3.5", "cond-corridor with k = 3.5", _cond_corridor(k=3.5)),
                ("cond-corridor-late", "cond-corridor (k = 2.5) in the second half of the steps only",
                 _cond_corridor(window=(0.5, 1.0))),
            ]
        ),
        _qsilk_part("qsilk", "QSilk defaults", _qsilk()),
        _qsilk_part("qsilk-strong", "QSilk strong: q=0.01, k 1.5-3", _qsilk(clamp_quantile=0.01, aqclip_k_min=1.5,
                                                                             aqclip_k_max=3.0)),  # fmt: skip
        _qsilk_part("qsilk-detail", "QSilk preset 'detail' (strong, auto tiles, HF restore late)",
                    lambda cfg: QSilkConfig.preset("detail")),  # fmt: skip
        _qsilk_part("qsilk-clamp", "QSilk micro-clamp only", _qsilk(aqclip=False)),
        _qsilk_part("qsilk-aqclip", "QSilk AQClip only", _qsilk(clamp=False)),
        _qsilk_part("qsilk-hard", "QSilk micro-clamp only, hard mode", _qsilk(aqclip=False, clamp_mode="hard")),
        _qsilk_part("qsilk-uniform", "QSilk with uniform AQClip confidence", _qsilk(confidence=None)),
        _qsilk_part("qsilk-attention", "QSilk with attention-entropy confidence", _qsilk(confidence="attention")),
        _qsilk_part("qsilk-tile8", "QSilk defaults, AQClip tiles 8 stride 4", _qsilk(aqclip_tile=8, aqclip_stride=4)),
        # issue 8 item 4 (tuning): tiles that scale with the latent, and the detail-preserving variants (qsilk.ops.detail)
        _qsilk_part("qsilk-auto", "QSilk defaults, AQClip tile/stride auto (4/2 on 16x16)", _qsilk(**_AUTO)),
        _qsilk_part("qsilk-strong-auto", "QSilk strong, AQClip tile/stride auto", _qsilk(**_STRONG, **_AUTO)),
        _qsilk_part("qsilk-strong-auto-gate", "QSilk strong, auto tiles, edge-gated AQClip (confidence 0.5-0.9)",
                    _qsilk(**_STRONG, **_AUTO, aqclip_edge_gate=True)),  # fmt: skip
        _qsilk_part("qsilk-strong-auto-hf", "QSilk strong, auto tiles, HF restore 1.0 in the second half",
                    _qsilk(**_STRONG, **_AUTO, hf_restore=1.0, hf_restore_window=(0.5, 1.0))),  # fmt: skip
        # issue 9: the shipped light QRM (src/qsilk/assets/qrm), attached for the cell and detached after it
        Part("qrm", "qrm-light", "shipped light demo QRM (adaLN deltas), docs/qrm.md", _demo_qrm, _demo_qrm_record),
    ]
}


def method_names() -> list[str]:
    """The registered parts (each is a method; join them with ``+`` to compose)."""
    return list(PARTS)


@dataclass(frozen=True)
class Method:
    name: str
    parts: tuple[Part, ...]

    def part(self, kind: str) -> Part | None:
        return next((p for p in self.parts if p.kind == kind), None)

    def record(self, cfg: float) -> dict:
        """JSON that says exactly what ran (for results and image records)."""
        return {
            "name": self.name,
            "guidance_scale": cfg,
            "parts": [{"kind": p.kind, "name": p.name, "summary": p.summary, "params": p.params(cfg)} for p in self.parts],
        }

    @contextlib.contextmanager
    def sampling(self, pipe, cfg: float) -> Iterator[dict]:
        """Install this method on ``pipe`` for the ``with`` block; yields the pipeline call's keyword arguments.
        The pipeline's scheduler and QSilk state are restored on exit."""
        import qsilk

        guider_part, x0_part = self.part("guider"), self.part("x0")
        guider = guider_part.build(cfg) if guider_part is not None else None
        if x0_part is not None:
            from qsilk.baselines import X0OperatorGuidance

            guider = X0OperatorGuidance(x0_part.build(cfg), guider=guider, guidance_scale=None if guider else cfg)
        corridor_part = self.part("corridor")
        if corridor_part is not None:
            from qsilk.guidance import ConditionalCorridorGuidance

            guider = ConditionalCorridorGuidance(
                guider=guider, guidance_scale=None if guider else cfg, **corridor_part.build(cfg)
            )
        kwargs: dict[str, Any] = {"guider": guider} if guider is not None else {"guidance_scale": cfg}
        original_scheduler = pipe.scheduler
        scheduler_part, qsilk_part, qrm_part = self.part("scheduler"), self.part("qsilk"), self.part("qrm")
        handle = qrm_handle = None
        try:
            if scheduler_part is not None:
                pipe.scheduler = scheduler_part.build(cfg)(pipe.scheduler)
            if qrm_part is not None:
                from qsilk.qrm import attach, load_qrm

                qrm_handle = attach(pipe, load_qrm(qrm_part.build(cfg), pipe.transformer))
            if qsilk_part is not None:
                handle = qsilk.enable(pipe, qsilk_part.build(cfg))
            yield kwargs
        finally:
            if handle is not None:
                handle.remove()
            if qrm_handle is not None:
                qrm_handle.remove()
            pipe.scheduler = original_scheduler


def get_method(name: str) -> Method:
    """A method from its name (parts joined by ``+``); ValueError naming the problem otherwise."""
    names = [n.strip() for n in str(name).split("+")]
    unknown = [n for n in names if n not in PARTS]
    if unknown or not name:
        raise ValueError(f"unknown method part(s) {unknown or [name]}; known: {', '.join(PARTS)}")
    parts = tuple(PARTS[n] for n in names)
    for kind in KINDS:
        same = [p.name for p in parts if p.kind == kind]
        if len(same) > 1:
            raise ValueError(f"method {name!r} combines {len(same)} parts of kind {kind!r} ({same}); at most one")
    if len(parts) > 1 and any(p.name == BASELINE for p in parts):
        parts = tuple(p for p in parts if p.name != BASELINE)  # "cfg+qsilk" == "qsilk"
    return Method("+".join(p.name for p in parts) if len(names) > 1 else names[0], parts)


__all__ = ["BASELINE", "PARTS", "Method", "Part", "get_method", "method_names"]
