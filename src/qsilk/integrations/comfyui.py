"""QSilk for ComfyUI: all the logic behind the ``comfyui_qsilk`` node pack, testable without ComfyUI.

ComfyUI is never imported here. The functions take ComfyUI's objects (a ``ModelPatcher``, the ``args`` dict of a
post-CFG function, the arguments of an attention call) and use only the hook contracts of ComfyUI 0.3.x:

- :func:`patch_model` clones the model and appends a :class:`QSilkPostCFG` with
  ``set_model_sampler_post_cfg_function``. That list is chainable (RescaleCFG and dynamic thresholding use the
  single ``sampler_cfg_function`` slot, APG the pre-CFG list), its ``args["denoised"]`` is the guided x0 for every
  model type and sampler, and it runs at CFG 1 without the unconditional branch.
- The step's schedule progress comes from its sigma and the sampler's sigmas list
  (``transformer_options["sample_sigmas"]``): :func:`progress_from_sigmas`.
- :func:`patch_attention` installs an :class:`AttentionConfidence` as
  ``transformer_options["optimized_attention_override"]`` (chaining any override already there) plus an
  ``apply_model`` wrapper that tells it the latent grid. It reads q and k of self-attention calls, conditional rows
  only (``transformer_options["cond_or_uncond"]``, so either CFG order), computes entropies with
  :mod:`qsilk.attention.entropy`, and calls the attention function unchanged.
- :func:`preview_images` turns the last run's confidence and |x0' - x0| maps into ComfyUI IMAGE tensors.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qsilk.attention.entropy import (
    attention_entropy,
    centered_positions,
    entropy_to_confidence,
    query_sample_grid,
    token_grid,
)
from qsilk.attention.probe import LayerRecord
from qsilk.config import QSilkConfig
from qsilk.stabilizer import QSilk

#: transformer_options key under which :func:`patch_attention` stores its recorder (found by the QSilk function).
ATTENTION_KEY = "qsilk_attention_confidence"
#: ``ModelPatcher.add_wrapper_with_key`` type and key of the latent-grid wrapper (comfy.patcher_extension.WrappersMP).
APPLY_MODEL_WRAPPER = "apply_model"
WRAPPER_KEY = "qsilk_attention"
_DEFAULTS = QSilkConfig()
#: ComfyUI's ``cond_or_uncond`` marks conditional batch chunks with 0 and unconditional ones with 1.
COND = 0


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


# -- where in the schedule ------------------------------------------------------------------------------------------


def _first_float(value: Any) -> float:
    if isinstance(value, Tensor):
        return float(value.detach().flatten()[0])
    return float(value)


def progress_from_sigmas(sigma: Tensor | float, sigmas: Tensor | Sequence[float]) -> float:
    """Schedule progress in [0, 1] of a model evaluation at ``sigma`` within the sampler's ``sigmas``.

    ``sigmas`` is the sampler's list (N + 1 decreasing values for N steps, the last usually 0). An evaluation at
    ``sigmas[i]`` is step i of N, progress ``i / (N - 1)`` (0 = first step, 1 = last), as
    :func:`qsilk.stabilizer.schedule_progress` counts diffusers steps. Samplers that also evaluate between two
    entries (Heun, DPM-2, the 2S/SDE variants) get a fractional index, linear in sigma between the bracketing
    entries. A batch of sigmas uses its first value (ComfyUI samplers give every sample the same sigma).
    """
    values = [
        float(s) for s in (sigmas.detach().flatten().cpu().tolist() if isinstance(sigmas, Tensor) else sigmas)
    ]
    if len(values) < 2:
        raise ValueError(f"sigmas must hold at least 2 values (1 step), got {len(values)}")
    s = _first_float(sigma)
    if not math.isfinite(s):
        raise ValueError(f"sigma must be finite, got {s}")
    num_steps = len(values) - 1
    last = num_steps - 1
    index = float(last)
    if s >= values[0]:
        index = 0.0
    else:
        for i in range(num_steps):
            hi, lo = values[i], values[i + 1]
            if lo <= s <= hi:
                index = i + (hi - s) / (hi - lo) if hi > lo else float(i)
                break
    return min(max(index / max(last, 1), 0.0), 1.0)


# -- attention-entropy confidence --------------------------------------------------------------------------------------


def model_layout(model: Any) -> tuple[str, int]:
    """(layout, patch size) of the token sequence at a ComfyUI model's attention calls.

    ``"self"``: a call's tokens are the image tokens on a (down-sampled) latent grid (UNets, DiT/PixArt).
    ``"text_first"``: joint attention over [text, image] tokens on the latent grid at ``patch_size`` (Flux, and
    SD3's MMDiT, which in ComfyUI concatenates the context first).
    """
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    names = {cls.__name__ for cls in type(diffusion_model).__mro__}
    if names & {"Flux", "MMDiT", "OpenAISignatureMMDITWrapper"}:
        return "text_first", int(getattr(diffusion_model, "patch_size", 2) or 2)
    return "self", 1


class AttentionConfidence:
    """ComfyUI ``optimized_attention_override`` that records self-attention entropy and changes nothing.

    Per model evaluation (one sigma), every self-attention call's conditional rows are measured on an evenly
    strided sample of at most ``max_queries`` queries and ``max_heads`` heads (:mod:`qsilk.attention.entropy`),
    head-averaged, mapped from the call's (h, w) token grid to the latent grid and averaged over calls.
    :meth:`confidence` turns that into 1 - H / log N (keys of joint attention included), as the diffusers probe does.

    Args:
        layout, patch_size: see :func:`model_layout`.
        previous: an override that was already installed; it is called in our place, so it keeps working.
    """

    def __init__(
        self,
        layout: str = "self",
        patch_size: int = 1,
        *,
        max_queries: int = 256,
        max_heads: int = 4,
        ema: float = 0.0,
        previous: Callable | None = None,
    ):
        if layout not in ("self", "text_first"):
            raise ValueError(f"layout must be 'self' or 'text_first', got {layout!r}")
        if max_queries < 1 or max_heads < 1:
            raise ValueError(f"max_queries and max_heads must be >= 1, got {max_queries}, {max_heads}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        self.layout = layout
        self.patch_size = int(patch_size)
        self.max_queries = int(max_queries)
        self.max_heads = int(max_heads)
        self.ema = float(ema)
        self.previous = previous
        self.problems: dict[str, str] = {}
        self._warned: set[str] = set()
        self._forward_hw: tuple[int, int] | None = None
        self._step_sigma: float | None = None
        self._ema_state: Tensor | None = None
        self.reset()

    # ComfyUI deep-copies model_options whenever a node clones the model: every clone keeps this one recorder.
    def __deepcopy__(self, memo: dict) -> AttentionConfidence:
        return self

    def reset(self) -> None:
        """Forget everything recorded (a new sampling run)."""
        self.step_sum: Tensor | None = None
        self.step_calls = 0
        self.step_grids: list[tuple[int, int]] = []  # token grid of every call measured in the current step
        self.step_records: list[LayerRecord] = []
        self.last_entropy: Tensor | None = None
        self._ema_state = None
        self._step_sigma = None

    # -- hooks ----------------------------------------------------------------------------------------------------

    def apply_model_wrapper(self, executor: Callable, *args: Any, **kwargs: Any) -> Any:
        """``apply_model`` wrapper: remembers the latent grid and sigma of the model evaluation in progress."""
        x, t = args[0], args[1]
        sigma = _first_float(t)
        if self._step_sigma is not None and sigma > self._step_sigma:
            self.reset()  # sigma went up: a new sampling run
        if sigma != self._step_sigma:
            self._start_step(sigma)
        self._forward_hw = (int(x.shape[-2]), int(x.shape[-1]))
        try:
            return executor(*args, **kwargs)
        finally:
            self._forward_hw = None

    def __call__(self, func: Callable, *args: Any, **kwargs: Any) -> Any:
        if self._forward_hw is not None:
            try:
                with torch.no_grad():
                    self._observe(args, kwargs)
            except Exception as exc:  # a measuring failure must never break generation
                self._problem("error", f"measuring failed: {exc!r}")
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    # -- results ------------------------------------------------------------------------------------------------------

    def entropy(self, latent_hw: tuple[int, int], batch_size: int) -> Tensor | None:
        """Mean normalised entropy (B, 1, H, W) of the evaluation in progress, or None if nothing usable."""
        if self.step_sum is None:
            return None
        mean = self.step_sum / self.step_calls
        if mean.shape[0] != batch_size or tuple(mean.shape[-2:]) != tuple(latent_hw):
            self._problem(
                "shape",
                f"recorded a {tuple(mean.shape)} entropy map but the latent is {batch_size} x {tuple(latent_hw)}",
            )
            return None
        return mean

    def confidence(self, latent_hw: tuple[int, int], batch_size: int) -> Tensor | None:
        """Confidence (B, 1, H, W) in [0, 1] for the evaluation just run (with the EMA over steps), or None."""
        entropy = self.entropy(latent_hw, batch_size)
        if entropy is None:
            return None
        if self.ema > 0 and self._ema_state is not None and self._ema_state.shape == entropy.shape:
            entropy = self.ema * self._ema_state + (1.0 - self.ema) * entropy
        self._ema_state = entropy
        self.last_entropy = entropy
        return entropy_to_confidence(entropy)

    # -- internals -------------------------------------------------------------------------------------------------------

    def _start_step(self, sigma: float) -> None:
        self._step_sigma = sigma
        self.step_sum = None
        self.step_calls = 0
        self.step_grids = []
        self.step_records = []

    def _problem(self, key: str, message: str) -> None:
        self.problems[key] = message
        if key not in self._warned:
            self._warned.add(key)
            _warn(f"QSilk attention confidence: {message}")

    def _image_tokens(self, seq: int, hw: tuple[int, int]) -> tuple[tuple[int, int], int] | None:
        """(token grid, offset of the first image token) of a self-attention call over ``seq`` tokens."""
        if self.layout == "self":
            grid = token_grid(seq, hw)
            return (grid, 0) if grid is not None else None
        grid = (math.ceil(hw[0] / self.patch_size), math.ceil(hw[1] / self.patch_size))
        text = seq - grid[0] * grid[1]
        return (grid, text) if text >= 0 else None

    def _observe(self, args: tuple, kwargs: dict) -> None:
        query, key = args[0], args[1]
        heads = int(args[3] if len(args) > 3 else kwargs["heads"])
        options = kwargs.get("transformer_options") or {}
        if kwargs.get("mask") is not None or len(args) > 4:
            return  # masked attention is text/cross attention here
        if kwargs.get("skip_reshape", False):
            q, k = query, key  # (B, heads, seq, dim)
        else:  # (B, seq, heads * dim), split as ComfyUI's attention functions do
            b, seq, inner = query.shape
            q = query.reshape(b, seq, heads, inner // heads).permute(0, 2, 1, 3)
            k = key.reshape(b, key.shape[1], heads, key.shape[2] // heads).permute(0, 2, 1, 3)
        batch, _, seq, _ = q.shape
        if k.shape[-2] != seq:
            return  # cross-attention
        located = self._image_tokens(seq, self._forward_hw)
        if located is None:
            self._problem("grid", f"{seq} tokens fit no token grid of the {self._forward_hw} latent")
            return
        grid, offset = located
        chunks = options.get("cond_or_uncond") or [COND]
        if batch % len(chunks):
            self._problem("batch", f"attention batch {batch} does not split into {len(chunks)} CFG chunks")
            return
        per_chunk = batch // len(chunks)
        cond_chunks = [i for i, kind in enumerate(chunks) if kind == COND]
        if not cond_chunks:
            return  # an unconditional-only evaluation
        sample_hw = query_sample_grid(*grid, self.max_queries)
        rows = centered_positions(grid[0], sample_hw[0], q.device)
        cols = centered_positions(grid[1], sample_hw[1], q.device)
        token_index = offset + (rows[:, None] * grid[1] + cols[None, :]).flatten()
        head_index = centered_positions(q.shape[1], min(self.max_heads, q.shape[1]), q.device)
        entropies, log_keys = [], []
        for chunk in cond_chunks:
            part = slice(chunk * per_chunk, (chunk + 1) * per_chunk)
            q_part = q[part].index_select(1, head_index).index_select(2, token_index)
            k_part = k[part].index_select(1, head_index)
            entropy, log_num_keys = attention_entropy(q_part, k_part)
            entropies.append(entropy)
            log_keys.append(log_num_keys)
        shape = (per_chunk, len(head_index), *sample_hw)
        record = LayerRecord(
            name=f"call{self.step_calls}",
            entropy=torch.stack(entropies).mean(0).view(shape),
            log_num_keys=torch.stack(log_keys).mean(0).view(shape),
            grid_hw=grid,
            token_index=token_index,
            head_index=head_index,
            batch_rows=(cond_chunks[0] * per_chunk, (cond_chunks[0] + 1) * per_chunk),
        )
        entropy_map = record.entropy_map(self._forward_hw)
        self.step_sum = entropy_map if self.step_sum is None else self.step_sum + entropy_map
        self.step_calls += 1
        self.step_grids.append(grid)
        self.step_records.append(record)


def find_attention(model_options: dict) -> AttentionConfidence | None:
    """The recorder :func:`patch_attention` installed in these model options, if any."""
    found = (model_options.get("transformer_options") or {}).get(ATTENTION_KEY)
    return found if isinstance(found, AttentionConfidence) else None


def patch_attention(
    model: Any, *, max_queries: int = 256, max_heads: int = 4, ema: float = 0.0
) -> tuple[Any, AttentionConfidence]:
    """Clone a ComfyUI ``ModelPatcher`` and install an :class:`AttentionConfidence` on the clone.

    The override slot is single, so an existing override is chained (ours measures, then calls it). The original
    model is not modified. Returns ``(clone, recorder)``.
    """
    patched = model.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    layout, patch_size = model_layout(patched)
    recorder = AttentionConfidence(
        layout,
        patch_size,
        max_queries=max_queries,
        max_heads=max_heads,
        ema=ema,
        previous=options.get("optimized_attention_override"),
    )
    options["optimized_attention_override"] = recorder
    options[ATTENTION_KEY] = recorder
    patched.add_wrapper_with_key(APPLY_MODEL_WRAPPER, WRAPPER_KEY, recorder.apply_model_wrapper)
    return patched, recorder


# -- the post-CFG function -----------------------------------------------------------------------------------------------


class QSilkPostCFG:
    """ComfyUI post-CFG function: ``args["denoised"]`` (the guided x0) -> ``QSilk(config)(x0, progress=...)``.

    Keeps what the last sampling run did for the preview node: per-evaluation ``stats`` (QSilk's ``last_stats``
    plus ``progress`` and ``sigma``), the last confidence map and the per-evaluation and summed |x0' - x0| maps
    (channel mean, on the CPU).
    """

    def __init__(self, config: QSilkConfig | None = None, *, record_maps: bool = True):
        self.config = config if config is not None else QSilkConfig()
        self.stabilizer = QSilk(self.config)
        self.record_maps = record_maps
        self._warned: set[str] = set()
        if self.config.attention_layers is not None:
            self._warn_once(
                "layers",
                "attention_layers names diffusers modules and is ignored in ComfyUI: the attention node reads "
                "every self-attention call",
            )
        moved = [
            name
            for name in ("attention_max_queries", "attention_max_heads", "attention_ema")
            if getattr(self.config, name) != getattr(_DEFAULTS, name)
        ]
        if moved:
            self._warn_once(
                "attention-options",
                f"{', '.join(moved)} are inputs of the 'QSilk attention confidence' node in ComfyUI; set them there",
            )
        self.reset()

    def __deepcopy__(self, memo: dict) -> QSilkPostCFG:  # see AttentionConfidence.__deepcopy__
        return self

    def reset(self) -> None:
        self.stabilizer.reset()
        self.stats: list[dict] = []
        self.last_confidence: Tensor | None = None
        self.last_change: Tensor | None = None
        self.change_sum: Tensor | None = None
        self._run_sigmas: Any = None
        self._last_progress = -1.0

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            _warn(f"QSilk: {message}")

    def progress(self, args: dict) -> float | None:
        sigmas = (args.get("model_options", {}).get("transformer_options") or {}).get("sample_sigmas")
        if sigmas is None:
            return None
        if sigmas is not self._run_sigmas:  # each sampling run passes its own sigmas tensor
            self.reset()
            self._run_sigmas = sigmas
        progress = progress_from_sigmas(args["sigma"], sigmas)
        if progress < self._last_progress:
            self.reset()
            self._run_sigmas = sigmas
        self._last_progress = progress
        return progress

    def __call__(self, args: dict) -> Tensor:
        x0 = args["denoised"]
        if self.config.is_noop:
            return x0
        if x0.ndim != 4:
            self._warn_once("ndim", f"a {tuple(x0.shape)} latent is not an image latent; left unchanged")
            return x0
        progress = self.progress(args)
        if self.config.placement == "final" and (progress is None or progress < 1.0):
            # "final": only the last evaluation, whose x0 first-order samplers return as the output
            return x0
        confidence = None
        if self.config.confidence == "attention":
            recorder = find_attention(args.get("model_options", {}))
            if recorder is None:
                self._warn_once(
                    "attention",
                    "confidence='attention' needs the 'QSilk attention confidence' node on the model; using the "
                    "structure proxy",
                )
            else:
                confidence = recorder.confidence(tuple(x0.shape[-2:]), x0.shape[0])
        out = self.stabilizer(x0, progress=progress, confidence=confidence)
        self._record(args, x0, out, progress)
        return out

    def _record(self, args: dict, x0: Tensor, out: Tensor, progress: float | None) -> None:
        self.stats.append(
            {**self.stabilizer.last_stats, "progress": progress, "sigma": _first_float(args["sigma"])}
        )
        if not self.record_maps:
            return
        change = (out.detach().float() - x0.detach().float()).abs().mean(dim=1, keepdim=True).cpu()
        self.last_change = change
        same_grid = self.change_sum is not None and self.change_sum.shape == change.shape
        self.change_sum = self.change_sum + change if same_grid else change
        if self.stabilizer.last_confidence is not None:
            self.last_confidence = self.stabilizer.last_confidence.detach().float().cpu()


def find_post_cfg(model_options: dict) -> list[QSilkPostCFG]:
    """The QSilk functions among a model's post-CFG functions, in order."""
    return [fn for fn in model_options.get("sampler_post_cfg_function", []) if isinstance(fn, QSilkPostCFG)]


def patch_model(model: Any, config: QSilkConfig | None = None) -> tuple[Any, QSilkPostCFG]:
    """Clone a ComfyUI ``ModelPatcher`` and append QSilk to the clone's post-CFG functions.

    The post-CFG list is chainable (other nodes' functions stay and run in order) and QSilk needs no
    unconditional branch, so ComfyUI's CFG 1 shortcut stays on. Returns ``(clone, function)``.
    """
    function = QSilkPostCFG(config)
    patched = model.clone()
    patched.set_model_sampler_post_cfg_function(function)
    return patched, function


# -- configs from node inputs ---------------------------------------------------------------------------------------------


def pair_fields() -> tuple[str, ...]:
    """QSilkConfig fields holding a (low, high) pair: node inputs ``{name}_start`` and ``{name}_end``."""
    return tuple(
        f.name
        for f in dataclasses.fields(QSilkConfig)
        if isinstance(getattr(_DEFAULTS, f.name), tuple) and len(getattr(_DEFAULTS, f.name)) == 2
    )


def config_from_inputs(
    values: dict[str, Any], config_json: str = "", preset: str | None = None
) -> QSilkConfig:
    """A QSilkConfig from node inputs: the widget values, or a named preset instead of them, then the keys the
    JSON sets on top (so a study's tuned config pastes in whole or in part).

    ``values`` uses QSilkConfig field names, with pairs (windows, ranges) as ``{name}_start`` / ``{name}_end``,
    ``confidence="uniform"`` for None and ``aqclip_auto_tile=True`` for tile and stride "auto". ``preset`` None,
    "" or "custom" means the widgets. Raises ValueError (unknown key or preset, value out of range, malformed
    JSON) with one message.
    """
    if preset not in (None, "", "custom"):
        if not hasattr(QSilkConfig, "preset"):
            raise ValueError("this qsilk has no named presets; choose 'custom'")
        data = QSilkConfig.preset(preset).to_dict()
    else:
        data = dict(values)
        for name in pair_fields():
            if f"{name}_start" in data or f"{name}_end" in data:
                default = getattr(_DEFAULTS, name)
                data[name] = (data.pop(f"{name}_start", default[0]), data.pop(f"{name}_end", default[1]))
        if data.get("confidence") == "uniform":
            data["confidence"] = None
        if data.pop("aqclip_auto_tile", False):
            data["aqclip_tile"] = data["aqclip_stride"] = "auto"
    if config_json and config_json.strip():
        data.update(_json_keys(config_json))
    return QSilkConfig.from_dict(data)


def _json_keys(text: str) -> dict[str, Any]:
    """Only the keys the JSON sets (validated as a whole config), so unset keys keep the widget values."""
    import json

    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"malformed QSilk config JSON: {err}") from None
    QSilkConfig.from_dict(data)  # validates keys and values on their own
    return data


# -- preview ---------------------------------------------------------------------------------------------------------------


def map_to_image(values: Tensor, *, upscale: int = 1, normalize: bool = True) -> Tensor:
    """A (B, 1, H, W) map -> ComfyUI IMAGE (B, H * upscale, W * upscale, 3) float32 in [0, 1].

    ``normalize`` divides each sample by its maximum (a map of zeros stays black); otherwise values are clipped
    to [0, 1]. Upscaling is nearest-neighbour so each latent pixel stays a visible block.
    """
    if values.ndim != 4 or values.shape[1] != 1:
        raise ValueError(f"expected a (B, 1, H, W) map, got {tuple(values.shape)}")
    if upscale < 1:
        raise ValueError(f"upscale must be >= 1, got {upscale}")
    image = values.detach().float().cpu()
    if normalize:
        peak = image.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        image = image / peak
    image = image.clamp(0.0, 1.0)
    if upscale > 1:
        image = F.interpolate(image, scale_factor=upscale, mode="nearest")
    return image.permute(0, 2, 3, 1).expand(-1, -1, -1, 3).contiguous()


def preview_images(
    function: QSilkPostCFG,
    *,
    upscale: int = 8,
    normalize: bool = True,
    latent_hw: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """(confidence, change) IMAGEs of the last run: the last AQClip confidence map and the |x0' - x0| summed over
    the run's evaluations. Before any run (or when the confidence was uniform) the map is black, sized from
    ``latent_hw`` (default 8 x 8)."""
    if function.change_sum is not None:
        blank = torch.zeros_like(function.change_sum)
    else:
        h, w = latent_hw or (8, 8)
        blank = torch.zeros(1, 1, h, w)
    confidence = function.last_confidence if function.last_confidence is not None else blank
    change = function.change_sum if function.change_sum is not None else blank
    return (
        map_to_image(confidence, upscale=upscale, normalize=False),
        map_to_image(change, upscale=upscale, normalize=normalize),
    )
