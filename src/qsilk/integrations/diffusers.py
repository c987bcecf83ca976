"""QSilk for diffusers pipelines: ``enable(pipe)`` / ``disable(pipe)``.

The patch is one instance attribute, ``pipe.scheduler.step``, wrapping the scheduler's own step. Per call it:

1. locates the call in the schedule and reads the x0 coefficients from the scheduler's state
   (:mod:`qsilk.sampling.adapters`), before the step changes that state;
2. converts the guided model output to x0 (unpacking Flux's 2x2-packed tokens to a (B, C, H, W) latent);
3. runs :class:`qsilk.QSilk` on x0 and converts back as a delta, ``out' = out + (x0' - x0) / c_out``, so elements
   QSilk leaves alone are bit-identical;
4. calls the original step with the new model output, so multistep histories (DPM-Solver++, UniPC) and Heun's
   stored derivative see the stabilised prediction.

Nothing else of the pipeline is touched, except a forward pre-hook on Flux-like transformers (to read the latent
grid from ``img_ids``) and the attention probe's hooks in attention mode. ``disable`` (or leaving the ``with``
block, or ``handle.remove()``) restores the scheduler's ``__dict__`` and removes the hooks.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from qsilk.config import QSilkConfig
from qsilk.sampling.adapters import (
    SchedulerAdapter,
    StepPoint,
    UnsupportedSchedulerError,
    adapter_for,
    output_to_x0,
    x0_delta_to_output,
)
from qsilk.stabilizer import QSilk, StepStats

_MISSING = object()
_HANDLE_ATTR = "_qsilk_handle"

ConfidenceProvider = Callable[[Tensor, int], Tensor | None]


# -- Flux token packing ------------------------------------------------------------------------------------------------


def unpack_tokens(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """Flux's packed latent (B, h*w, C*4) -> (B, C, 2h, 2w); each token is a channel-major 2x2 patch."""
    b, n, d = tokens.shape
    h, w = grid
    if n != h * w or d % 4:
        raise ValueError(f"cannot unpack {tuple(tokens.shape)} tokens on a {h}x{w} grid of 2x2 patches")
    c = d // 4
    return tokens.reshape(b, h, w, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 2 * h, 2 * w)


def pack_tokens(latent: Tensor) -> Tensor:
    """Inverse of :func:`unpack_tokens`: (B, C, 2h, 2w) -> (B, h*w, C*4)."""
    b, c, hh, ww = latent.shape
    h, w = hh // 2, ww // 2
    return latent.reshape(b, c, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * 4)


def grid_from_ids(img_ids: Tensor, num_tokens: int) -> tuple[int, int] | None:
    """(h, w) of the first ``num_tokens`` image tokens from Flux's ``img_ids`` rows (0, row, col), if row-major."""
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    if ids.ndim != 2 or ids.shape[-1] < 3 or ids.shape[0] < num_tokens:
        return None
    ids = ids[:num_tokens].round().long()
    rows, cols = ids[:, 1] - ids[:, 1].min(), ids[:, 2] - ids[:, 2].min()
    h, w = int(rows.max()) + 1, int(cols.max()) + 1
    if h * w != num_tokens:
        return None
    index = torch.arange(num_tokens, device=ids.device)
    if not (torch.equal(rows, index // w) and torch.equal(cols, index % w)):
        return None
    return (h, w)


# The CFG layout of diffusers pipelines, the one place the attention probe learns which half of a CFG batch is the
# conditional one. Facts read in the diffusers 0.42.1 sources (tests/test_integration_attention.py re-reads the
# installed sources for every entry). A pipeline's own ``cfg_order`` attribute takes precedence (the demo pipeline
# declares one); a subclass inherits its base's entry; an unknown pipeline gets "uncond_cond" with a warning.
#   "uncond_cond": one denoiser call on [uncond, cond]: torch.cat([negative_prompt_embeds, prompt_embeds]),
#                  noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
#   "cond_uncond": one denoiser call on [cond, uncond] (cond_eps, uncond_eps = torch.split(eps, len(eps) // 2)), or
#                  separate denoiser calls with the conditional one first (the probe keeps a step's first call)
CFG_ORDER: dict[str, str] = {
    **dict.fromkeys(
        (
            # Stable Diffusion 1.x / 2.x
            "StableDiffusionPipeline",
            "StableDiffusionImg2ImgPipeline",
            "StableDiffusionInpaintPipeline",
            "StableDiffusionControlNetPipeline",
            # SDXL, Kolors
            "StableDiffusionXLPipeline",
            "StableDiffusionXLImg2ImgPipeline",
            "StableDiffusionXLInpaintPipeline",
            "StableDiffusionXLControlNetPipeline",
            "KolorsPipeline",
            # SD3 / SD3.5 (skip-layer guidance adds a third, separate call after the batched one)
            "StableDiffusion3Pipeline",
            "StableDiffusion3Img2ImgPipeline",
            "StableDiffusion3InpaintPipeline",
            "StableDiffusion3ControlNetPipeline",
            # DiT-like text-to-image transformers
            "PixArtAlphaPipeline",
            "PixArtSigmaPipeline",
            "SanaPipeline",
            "HunyuanDiTPipeline",
            "AuraFlowPipeline",
        ),
        "uncond_cond",
    ),
    # batched [cond, uncond]: DiT (class-conditional; steps on the doubled latent batch), Lumina-Next
    **dict.fromkeys(("DiTPipeline", "LuminaPipeline"), "cond_uncond"),
    # separate calls, conditional first: Flux "true CFG" (negative prompt), Chroma, Qwen-Image, Lumina 2, CogView4
    **dict.fromkeys(
        (
            "FluxPipeline",
            "FluxImg2ImgPipeline",
            "FluxInpaintPipeline",
            "FluxControlNetPipeline",
            "FluxKontextPipeline",
            "ChromaPipeline",
            "QwenImagePipeline",
            "Lumina2Pipeline",
            "CogView4Pipeline",
        ),
        "cond_uncond",
    ),
}
CFG_ORDERS = ("uncond_cond", "cond_uncond")


def cfg_order_of(pipe: Any) -> str:
    """The CFG batch order of a pipeline's denoiser calls: ``"uncond_cond"`` or ``"cond_uncond"``.

    The pipeline's own ``cfg_order`` attribute if it declares one, else the entry of its class (or of the nearest
    base class) in :data:`CFG_ORDER`; an unknown pipeline gets diffusers' usual "uncond_cond" and a warning."""
    declared = getattr(pipe, "cfg_order", None)
    if declared is not None:
        if declared not in CFG_ORDERS:
            raise ValueError(f"{type(pipe).__name__}.cfg_order must be one of {CFG_ORDERS}, got {declared!r}")
        return declared
    for cls in type(pipe).__mro__:
        if cls.__name__ in CFG_ORDER:
            return CFG_ORDER[cls.__name__]
    warnings.warn(
        f"qsilk: the CFG batch order of {type(pipe).__name__} is unknown (not in "
        "qsilk.integrations.diffusers.CFG_ORDER); the attention probe assumes diffusers' usual [uncond, cond]. "
        "If this pipeline batches [cond, uncond], set pipe.cfg_order = 'cond_uncond' before qsilk.enable.",
        RuntimeWarning,
        stacklevel=2,
    )
    return "uncond_cond"


# -- the handle ------------------------------------------------------------------------------------------------------------


class QSilkHandle:
    """What :func:`enable` installed on a pipeline; a context manager that removes it on exit.

    Attributes:
        stab: the :class:`qsilk.QSilk` instance applied at each step.
        config: its :class:`qsilk.QSilkConfig`.
        stats: one dict per scheduler call: ``stab.last_stats`` plus ``step``, ``progress``, ``timestep``,
            ``sigma``, ``index`` (position in ``scheduler.timesteps``), ``phase``, ``run`` and ``confidence_source``
            (JSON-serialisable). ``confidence_source`` says where the step's AQClip confidence came from: "structure",
            None (uniform), "attention" (the probe's map), "custom" (a user's provider), or, when the provider gave
            no map, "structure (fallback: <reason>)" (e.g. a fast attention backend bypassed SDPA).
        maps: with ``record_maps=True``, one dict per call: ``step``, ``confidence`` ((B, 1, H, W) cpu float or
            None) and ``delta`` ((B, 1, H, W) cpu float, mean |x0' - x0| over channels).
        confidence_provider: callable(x0, step) -> (B, 1, h, w) map in [0, 1] or None, called on every scheduler
            call when set; None uses the config's own confidence source. Attention mode sets it to the probe.
        probe: the attention probe in attention mode, else None.
    """

    def __init__(self, pipe: Any, config: QSilkConfig, adapter: SchedulerAdapter, record_maps: bool = False):
        self.pipe = pipe
        self.config = config
        self.stab = QSilk(config)
        self.adapter = adapter
        self.record_maps = bool(record_maps)
        self._stats: list[tuple[StepStats | None, dict]] = []  # device-side until .stats is read
        self.maps: list[dict] = []
        self.confidence_provider: ConfidenceProvider | None = None
        self.probe = None
        self.scheduler = pipe.scheduler
        self._saved_step: Any = _MISSING
        self._wrapper: Callable | None = None
        self._hooks: list = []
        self._img_ids: Tensor | None = None
        self._grid_cache: tuple[Tensor, int, tuple[int, int] | None] | None = None
        self._timesteps_ref: Tensor | None = None
        self._last_index: int | None = None
        self._run = -1
        self._last_confidence: Tensor | None = None
        self._warned: set[str] = set()
        self._installed = False
        # where this step's AQClip confidence came from; see the class docstring (stats key "confidence_source")
        self._confidence_source: str | None = config.confidence

    # -- lifecycle -------------------------------------------------------------------------------------------------

    @property
    def installed(self) -> bool:
        return self._installed

    @property
    def stats(self) -> list[dict]:
        """One JSON-safe dict per scheduler call (see the class docstring). Statistics stay on the device during
        sampling; reading this list copies the pending ones to the host in one transfer."""
        pending = [entry for entry in self._stats if entry[0] is not None]
        values = StepStats.to_dicts([entry[0] for entry in pending])
        for entry, value in zip(pending, values, strict=True):
            entry[1].update(value)
        self._stats = [(None, extra) for _, extra in self._stats]
        return [extra for _, extra in self._stats]

    def _patch_scheduler(self, scheduler) -> None:
        self.scheduler = scheduler
        self._saved_step = scheduler.__dict__.get("step", _MISSING)
        original = scheduler.step  # bound method, or a previous instance-level wrapper (composes)

        def step(*args, **kwargs):
            # removed (or moved to a new pipe.scheduler) while another wrapper sat on top of this one: pass through
            if not self._installed or self._wrapper is not step:
                return original(*args, **kwargs)
            return self._step(original, args, kwargs)

        # Pipelines inspect step's signature to decide which kwargs (generator, eta) to pass: keep it visible.
        step.__signature__ = inspect.signature(original)  # type: ignore[attr-defined]
        step.__wrapped__ = original  # type: ignore[attr-defined]
        step.__doc__ = getattr(original, "__doc__", None)
        step.__qsilk_handle__ = self  # type: ignore[attr-defined]
        scheduler.step = step
        self._wrapper = step
        self._timesteps_ref, self._last_index = None, None

    def _unpatch_scheduler(self) -> None:
        scheduler = self.scheduler
        if scheduler.__dict__.get("step") is not self._wrapper:
            # Someone wrapped step after us: unwrapping would drop their wrapper, so ours stays as a pass-through.
            warnings.warn(
                f"qsilk: {type(scheduler).__name__}.step was wrapped again after qsilk.enable; qsilk now passes "
                "through unchanged but stays in that chain until the outer wrapper is removed.",
                RuntimeWarning,
                stacklevel=4,
            )
        elif self._saved_step is _MISSING:
            scheduler.__dict__.pop("step", None)
        else:
            scheduler.step = self._saved_step
        self._wrapper = None

    def _follow_scheduler(self) -> None:
        """Denoiser pre-hook: when ``pipe.scheduler`` was replaced after ``enable``, move the patch to the new
        scheduler before it steps (or raise if it has no adapter), so QSilk never goes silently inert."""
        new = getattr(self.pipe, "scheduler", None)
        if new is self.scheduler or new is None:
            return
        try:
            adapter = adapter_for(new)
        except UnsupportedSchedulerError as err:
            raise UnsupportedSchedulerError(
                f"pipe.scheduler was replaced by {type(new).__name__} after qsilk.enable and qsilk cannot follow: "
                f"{err} (qsilk.disable(pipe) runs without QSilk)"
            ) from None
        previous = getattr(new.__dict__.get("step"), "__qsilk_handle__", None)
        if previous is not None and previous is not self:  # one QSilk per scheduler, the newest wins
            previous.remove()
        self._unpatch_scheduler()
        self.adapter = adapter
        self._patch_scheduler(new)

    def _install(self) -> QSilkHandle:
        self._patch_scheduler(self.scheduler)
        # one pre-hook on the denoiser: follow a replaced pipe.scheduler, read Flux's img_ids
        for name in ("transformer", "unet", "prior"):
            model = getattr(self.pipe, name, None)
            if isinstance(model, torch.nn.Module):
                self._hooks.append(model.register_forward_pre_hook(self._before_denoiser, with_kwargs=True))
                break
        if self.config.confidence == "attention" and not self.config.is_noop:
            self._install_probe()
        self._installed = True
        return self

    def _install_probe(self) -> None:
        from qsilk.attention import AttentionEntropyProbe

        model = getattr(self.pipe, "unet", None)
        if not isinstance(model, torch.nn.Module):
            model = getattr(self.pipe, "transformer", None)
        if not isinstance(model, torch.nn.Module):
            raise ValueError(
                f"confidence='attention' needs a pipeline with a `unet` or `transformer`; {type(self.pipe).__name__} "
                "has neither"
            )
        cfg = self.config
        self.probe = AttentionEntropyProbe(
            model,
            cfg.attention_layers,
            max_queries=cfg.attention_max_queries,
            max_heads=cfg.attention_max_heads,
            ema=cfg.attention_ema,
            cfg_order=cfg_order_of(self.pipe),
        ).install()
        probe = self.probe
        self.confidence_provider = lambda x0, step: probe.confidence(tuple(x0.shape[-2:]), x0.shape[0])

    def remove(self) -> None:
        """Restore the scheduler's ``step`` exactly and take every hook off. Idempotent."""
        if not self._installed:
            return
        self._unpatch_scheduler()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self.probe is not None:
            self.probe.remove()
        self._installed = False
        if getattr(self.pipe, _HANDLE_ATTR, None) is self:
            delattr(self.pipe, _HANDLE_ATTR)

    def clear_stats(self) -> None:
        self._stats.clear()
        self.maps.clear()

    def reset(self) -> None:
        """Start afresh: QSilk's EMA state and the probe's; called automatically when a new sampling run starts."""
        self.stab.reset()
        if self.probe is not None:
            # A new run is noticed at its first scheduler call, after the denoiser already ran for that step:
            # forget the previous run's EMA but keep the forward the probe just captured.
            self.probe.reset(keep_pending=True)
        self._last_confidence = None

    def __enter__(self) -> QSilkHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "installed" if self._installed else "removed"
        return f"QSilkHandle({type(self.pipe).__name__}, {type(self.scheduler).__name__}, {state})"

    # -- hooks -------------------------------------------------------------------------------------------------------

    def _before_denoiser(self, module, args, kwargs) -> None:
        self._follow_scheduler()
        self._read_img_ids(module, args, kwargs)

    def _read_img_ids(self, module, args, kwargs) -> None:
        ids = kwargs.get("img_ids")
        if isinstance(ids, Tensor):
            self._img_ids = ids

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    # -- the wrapped step -------------------------------------------------------------------------------------------------

    def _step(self, original: Callable, args: tuple, kwargs: dict):
        args = list(args)
        model_output, timestep, sample = (
            _take(args, kwargs, i, name) for i, name in enumerate(("model_output", "timestep", "sample"))
        )
        if not (isinstance(model_output, Tensor) and isinstance(sample, Tensor)):
            return original(*args, **kwargs)
        if kwargs.get("per_token_timesteps") is not None:
            self._warn_once(
                "per-token", "qsilk: per_token_timesteps are not supported; this step runs untouched."
            )
            return original(*args, **kwargs)

        point = self.adapter.locate(self.scheduler, timestep)
        self._maybe_new_run(point)
        base = sample  # what the step takes x0 from: the sample, or Euler's churned sample (s_churn > 0)
        if self.adapter.adjust is not None:
            bound = inspect.signature(original).bind(*args, **kwargs)
            bound.apply_defaults()
            adjusted = self.adapter.adjust(self.scheduler, point, sample, dict(bound.arguments))
            if adjusted is not None:
                base, point = adjusted
        prediction = model_output
        learned_variance = (
            model_output.ndim == sample.ndim
            and model_output.ndim >= 2
            and model_output.shape[1] == 2 * sample.shape[1]
        )
        if learned_variance:  # DDPM/DiT learned sigma: only the first C channels are the prediction
            prediction = model_output[:, : sample.shape[1]]

        view = self._latent_view(sample)
        final = self.config.placement == "final"
        if view is not None:
            to_4d, from_4d = view
            x0 = to_4d(output_to_x0(base, prediction, point.c_skip, point.c_out))
            confidence = self._confidence(x0, point)  # every call: the probe consumes its step here
            if not final:
                x0_new = self.stab(x0, progress=point.progress, confidence=confidence)
                self._record(point, timestep, x0, x0_new)
                if x0_new is not x0 and point.c_out != 0:  # unchanged elements stay bit-identical (torch.where)
                    new_prediction = x0_delta_to_output(prediction, from_4d(x0), from_4d(x0_new), point.c_out)
                    if learned_variance:
                        new_prediction = torch.cat(
                            [new_prediction, model_output[:, sample.shape[1] :]], dim=1
                        )
                    _put(args, kwargs, 0, "model_output", new_prediction)

        result = original(*args, **kwargs)
        if final and view is not None and point.index == len(self.scheduler.timesteps) - 1:
            result = self._apply_final(result, point, timestep, view)
        return result

    def _maybe_new_run(self, point: StepPoint) -> None:
        timesteps = self.scheduler.timesteps
        new_run = (
            timesteps is not self._timesteps_ref
            or self._last_index is None
            or point.index <= self._last_index
        )
        if new_run:
            self.reset()
            self._run += 1
            self._timesteps_ref = timesteps
        self._last_index = point.index

    def _latent_view(
        self, sample: Tensor
    ) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]] | None:
        """(to (B, C, H, W), back) for this sample layout, or None (warned) when QSilk cannot see it as an image."""
        if sample.ndim == 4:
            return (lambda x: x), (lambda x: x)
        if sample.ndim == 3:
            grid = self._grid(int(sample.shape[1]))
            if grid is not None and sample.shape[2] % 4 == 0:
                return (lambda x: unpack_tokens(x, grid)), pack_tokens
            self._warn_once(
                "grid",
                f"qsilk: cannot tell the latent grid of packed {tuple(sample.shape)} latents (no Flux-style img_ids "
                "seen on pipe.transformer); these steps run untouched.",
            )
            return None
        self._warn_once(
            "ndim",
            f"qsilk: {sample.ndim}-D latents {tuple(sample.shape)} are not supported; steps run untouched.",
        )
        return None

    def _grid(self, num_tokens: int) -> tuple[int, int] | None:
        ids = self._img_ids
        if ids is None:
            return None
        if self._grid_cache is None or self._grid_cache[0] is not ids or self._grid_cache[1] != num_tokens:
            self._grid_cache = (ids, num_tokens, grid_from_ids(ids, num_tokens))
        return self._grid_cache[2]

    def _confidence(self, x0: Tensor, point: StepPoint) -> Tensor | None:
        if self.confidence_provider is None:
            self._confidence_source = self.config.confidence
            return None
        confidence = self.confidence_provider(x0, point.step)
        self._last_confidence = confidence
        self._confidence_source = self._source_of(confidence)
        return confidence

    def _source_of(self, confidence: Tensor | None) -> str | None:
        """The stats' ``confidence_source``: "attention" (or "custom", a user's provider) when the provider gave a
        map, else what QSilk falls back to and why: "structure (fallback: <reason>)" ("uniform (...)" without a
        configured source)."""
        if confidence is not None:
            return "attention" if self.probe is not None else "custom"
        if self.probe is not None:
            reason = self.probe.last_problem or "the attention probe returned no map"
        else:
            reason = "the confidence provider returned no map"
        fallback = "uniform" if self.config.confidence is None else "structure"
        return f"{fallback} (fallback: {reason})"

    def _record(self, point: StepPoint, timestep, x0: Tensor, x0_new: Tensor, final: bool = False) -> None:
        entry = dict(
            step=point.step,
            progress=1.0 if final else point.progress,
            timestep=float(timestep.item() if isinstance(timestep, Tensor) else timestep),
            sigma=point.sigma if point.sigma is not None and math.isfinite(point.sigma) else None,  # inf: a = 0
            index=point.index,
            phase=point.phase,
            run=self._run,
            placement=self.config.placement,
            confidence_source=self._confidence_source,
        )
        self._stats.append((self.stab.last_step_stats, entry))
        if self.record_maps:
            confidence = self.stab.last_confidence
            if confidence is None:
                confidence = self._last_confidence
            if confidence is None and self.config.confidence is not None:
                from qsilk.ops import structure_confidence

                confidence = structure_confidence(x0)
            self.maps.append(
                {
                    "step": point.step,
                    "confidence": None if confidence is None else confidence.detach().float().cpu(),
                    "delta": (x0_new.float() - x0.float()).abs().mean(dim=1, keepdim=True).cpu(),
                }
            )

    def _apply_final(self, result, point: StepPoint, timestep, view):
        """placement="final": QSilk on the sample the last step returns (the reference AQClip placement)."""
        to_4d, from_4d = view
        prev = result[0] if isinstance(result, tuple) else result.prev_sample
        latent = to_4d(prev)
        new = self.stab(latent, progress=1.0, confidence=self._last_confidence)  # once, at the end of the schedule
        self._record(point, timestep, latent, new, final=True)
        if new is latent:
            return result
        new_prev = from_4d(new).to(prev.dtype)
        if isinstance(result, tuple):
            return (new_prev, *result[1:])
        result.prev_sample = new_prev
        return result


def _take(args: list, kwargs: dict, position: int, name: str):
    if name in kwargs:
        return kwargs[name]
    return args[position] if position < len(args) else None


def _put(args: list, kwargs: dict, position: int, name: str, value) -> None:
    if name in kwargs or position >= len(args):
        kwargs[name] = value
    else:
        args[position] = value


# -- public API ------------------------------------------------------------------------------------------------------------


def _resolve_config(config: QSilkConfig | dict | str | None, overrides: dict) -> QSilkConfig:
    if config is None:
        config = QSilkConfig()
    elif isinstance(config, dict):
        config = QSilkConfig.from_dict(config)
    elif isinstance(config, str):
        config = QSilkConfig.from_json(config)
    elif not isinstance(config, QSilkConfig):
        raise TypeError(f"config must be a QSilkConfig, a dict or JSON, got {type(config).__name__}")
    if overrides:
        try:
            config = config.replace(**overrides)
        except TypeError as err:
            raise ValueError(f"unknown QSilk option in {sorted(overrides)}: {err}") from None
    return config


def enable(
    pipe: Any,
    config: QSilkConfig | dict | str | None = None,
    *,
    record_maps: bool = False,
    **config_overrides: Any,
) -> QSilkHandle:
    """Stabilise every sampler step of a diffusers pipeline with QSilk. Returns a handle (also a context manager).

    Important args:
        pipe: a diffusers pipeline whose ``scheduler`` is supported (see
            :data:`qsilk.sampling.SUPPORTED_SCHEDULERS`); otherwise ``UnsupportedSchedulerError`` names it.
        config: a :class:`QSilkConfig` (default: ``QSilkConfig()``), a dict or JSON text/path.
        **config_overrides: config fields to change, e.g. ``enable(pipe, clamp_quantile=0.005)``.

    Args to tinker with:
        record_maps: also keep per-step confidence and |x0' - x0| maps on the cpu in ``handle.maps``.

    Enabling again replaces the previous patch. ``disable(pipe)``, ``handle.remove()`` or leaving a ``with`` block
    restore the pipeline exactly. A no-op config (``QSilkConfig.noop()``) leaves every output bit-identical.
    """
    config = _resolve_config(config, config_overrides)
    if getattr(pipe, "scheduler", None) is None:
        raise TypeError(
            f"qsilk.enable needs a diffusers pipeline with a scheduler, got {type(pipe).__name__}"
        )
    adapter = adapter_for(pipe.scheduler)
    disable(pipe)
    # Pipelines built from another's components share its scheduler: one QSilk per scheduler, the newest wins.
    previous = getattr(pipe.scheduler.__dict__.get("step"), "__qsilk_handle__", None)
    if previous is not None:
        previous.remove()
    handle = QSilkHandle(pipe, config, adapter, record_maps=record_maps)
    handle._install()
    setattr(pipe, _HANDLE_ATTR, handle)
    return handle


def disable(pipe: Any) -> None:
    """Remove QSilk from a pipeline (no-op when it is not enabled)."""
    handle = getattr(pipe, _HANDLE_ATTR, None)
    if handle is not None:
        handle.remove()


def get_handle(pipe: Any) -> QSilkHandle | None:
    """The active handle on ``pipe``, if QSilk is enabled."""
    return getattr(pipe, _HANDLE_ATTR, None)


__all__ = ["QSilkHandle", "cfg_order_of", "disable", "enable", "get_handle", "pack_tokens", "unpack_tokens"]
