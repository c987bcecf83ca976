"""Attention-entropy probe for diffusers denoisers (UNet SD/SDXL, SD3/3.5, Flux, DiT/PixArt).

How it reads attention without replacing it: a forward pre-hook on each probed attention module pushes a
``TorchFunctionMode`` for the duration of that module's forward (diffusers' own PAG/layer-skip hooks intercept SDPA
the same way). The mode sees the processor's ``F.scaled_dot_product_attention(q, k, v, ...)`` call, computes the
entropy of softmax(q k^T * scale + mask) for a small strided sample of queries and heads in fp32, and then makes
the original call with the original arguments. Processors are never swapped, so outputs are bit-identical and
``remove()`` only has hooks to take off. Queries, heads and mask entries are selected before anything is computed
or copied: the full (B, heads, N, N) mask or attention matrix is never built.

Confidence = 1 - entropy / log N, per sampled query, averaged over heads and layers: the absolute level, not a
per-sample stretch, so a sharper attention always gives a higher confidence (see :mod:`qsilk.attention.entropy`).
N is the number of keys the query may attend to (keys the mask allows; all keys without a mask).

Joint attention (SD3/SD3.5 ``attn``, Flux double and single blocks): the SDPA call holds image and text tokens
together. Only image tokens are used as queries (the map lives on the image grid), but each query's distribution is
the one the model actually uses, over all its keys, image and text: the entropy is not renormalised over the image
keys, and N counts the text keys too (N = image tokens + text tokens, minus masked keys). A query that puts its
attention on a few text tokens is as "decided" as one that puts it on a few image tokens. The text share of N is
small at image resolutions (SD3 at 1024 px: 4096 image + 333 text tokens, log N changes by < 1 %).

Per step the probe keeps the first denoiser forward after the last :meth:`AttentionEntropyProbe.confidence` call.
With batched CFG that forward holds both branches and only the conditional half is measured; which half that is
comes from ``cfg_order`` (diffusers' SD/SDXL/SD3/PixArt pipelines batch [uncond, cond]; DiT and Lumina batch
[cond, uncond]; the diffusers integration reads it from one table, ``qsilk.integrations.diffusers.CFG_ORDER``).
With ``cfg_batched="auto"`` the sampled queries and keys of every row are kept (small copies) and the entropy is
computed in :meth:`~AttentionEntropyProbe.confidence` once the latent batch size tells which rows are the
conditional half, so only that half is ever measured. Pipelines that run the branches as separate forwards
(Flux true CFG, Lumina 2, CogView4, guiders) run the conditional one first.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from qsilk.attention.entropy import (
    attention_entropy,
    centered_positions,
    entropy_to_confidence,
    normalized_entropy,
    query_sample_grid,
    select_attention_mask,
    token_grid,
)
from qsilk.attention.layers import ProbeLayer, select_layers

SDPA_ARG_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
FALLBACK_HINT = (
    "Attention confidence is unavailable for this step: confidence() returns None so the caller falls back to "
    "the structure proxy."
)


@dataclass(frozen=True)
class LayerRecord:
    """What one probed layer saw in one step (conditional batch half only)."""

    name: str
    entropy: Tensor  # (B, heads, hs, ws) entropy in nats, fp32, of the sampled queries
    log_num_keys: Tensor  # (B, heads, hs, ws) log of the keys each sampled query could attend to
    grid_hw: tuple[int, int]  # the layer's token grid
    token_index: Tensor  # (hs * ws,) positions of the sampled queries in the SDPA sequence (row-major sample)
    head_index: Tensor  # (heads,) sampled query heads
    batch_rows: tuple[int, int]  # [start, stop) rows of the denoiser batch measured (the cond half with CFG)

    @property
    def normalized(self) -> Tensor:
        return normalized_entropy(self.entropy, self.log_num_keys)

    def entropy_map(self, latent_hw: tuple[int, int]) -> Tensor:
        """Head-averaged normalised entropy resized to the latent grid: (B, 1, H, W)."""
        sample = self.normalized.mean(dim=1, keepdim=True)
        downsampling = sample.shape[-2] > latent_hw[0] or sample.shape[-1] > latent_hw[1]
        return F.interpolate(
            sample, size=tuple(latent_hw), mode="bilinear", align_corners=False, antialias=downsampling
        )


@dataclass(frozen=True)
class _Sampled:
    """The sampled queries, keys and mask entries of one layer, for a run of batch rows, not yet measured.

    Holds copies of the selected slices only (rows x sampled heads x sampled queries x D for q, rows x sampled
    heads x keys x D for k), in the model's dtype."""

    name: str
    query: Tensor  # (rows, heads_s, queries_s, D)
    key: Tensor  # (rows, heads_s, K, D)
    mask: Tensor | None  # broadcastable to (rows, heads_s, queries_s, K)
    scale: float | None
    grid_hw: tuple[int, int]
    sample_hw: tuple[int, int]
    token_index: Tensor
    head_index: Tensor
    first_row: int  # denoiser batch row of query[0]

    @property
    def rows(self) -> int:
        return int(self.query.shape[0])

    def measure(self, start: int = 0, stop: int | None = None) -> LayerRecord:
        """Entropy of rows [start, stop) of this sample (relative to ``first_row``)."""
        stop = self.rows if stop is None else stop
        mask = self.mask
        if mask is not None and mask.shape[0] != 1:
            mask = mask[start:stop]
        with torch.no_grad():
            entropy, log_num_keys = attention_entropy(
                self.query[start:stop], self.key[start:stop], scale=self.scale, attn_mask=mask
            )
        shape = (stop - start, len(self.head_index), *self.sample_hw)
        return LayerRecord(
            name=self.name,
            entropy=entropy.view(shape),
            log_num_keys=log_num_keys.view(shape),
            grid_hw=self.grid_hw,
            token_index=self.token_index,
            head_index=self.head_index,
            batch_rows=(self.first_row + start, self.first_row + stop),
        )


@dataclass
class _ForwardContext:
    """Facts about the current denoiser call that the attention layers cannot see."""

    base_hw: tuple[int, int] | None = None  # latent (H, W), or Flux's packed token grid
    text_tokens: int = 0  # length of the text context joined to the image tokens (SD3, Flux)
    cfg_batched: bool | None = False  # None: "auto", decided by confidence() from the latent batch size
    problem: str | None = None


class _SDPATap(TorchFunctionMode):
    """Active only inside one probed attention module: reads SDPA's arguments, then makes the call unchanged."""

    def __init__(self, on_sdpa: Callable[[dict], None]):
        super().__init__()
        self._on_sdpa = on_sdpa

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self._on_sdpa({**dict(zip(SDPA_ARG_NAMES, args, strict=False)), **kwargs})
        return func(*args, **kwargs)


@dataclass
class _StepState:
    # LayerRecord, or _Sampled (cfg_batched="auto": measured by confidence() once the conditional rows are known)
    records: dict[str, LayerRecord | _Sampled] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    forward_seen: bool = False
    capturing: bool = False
    context: _ForwardContext = field(default_factory=_ForwardContext)


class AttentionEntropyProbe:
    """Confidence map (1 - entropy / log N, the absolute level) from a diffusers UNet or transformer.

    Important args:
        model: ``pipe.unet`` or ``pipe.transformer``.
        layers: module-name glob patterns (``"mid_block.*.attn1"``); None = the architecture default
            (see :func:`qsilk.attention.layers.default_layer_names`).
        cfg_batched: whether the denoiser batch is a CFG batch, of which only the conditional half is read: a bool,
            a callable read at each forward (e.g. ``lambda: pipe.do_classifier_free_guidance``), or ``"auto"``
            (default): CFG-batched iff the denoiser batch is twice the ``batch_size`` given to confidence(); the
            entropy is then computed in confidence(), for the conditional half only.
        cfg_order: ``"uncond_cond"`` (diffusers' SD/SDXL/SD3/PixArt pipelines) or ``"cond_uncond"``
            (diffusers' DiT and Lumina pipelines); the diffusers integration takes it from ``cfg_order_of(pipe)``.

    Args to tinker with:
        max_queries: queries sampled per layer, on an evenly strided sub-grid of the layer's token grid.
        max_heads: heads sampled per layer, evenly spread.
        ema: EMA factor over steps of the entropy map (0 = off).

    After each confidence() call, ``last_problem`` is None when a map was returned, else the reason there was none
    (integrations record it, e.g. ``confidence_source = "structure (fallback: <reason>)"``).

    Usage::

        with AttentionEntropyProbe(pipe.unet) as probe:
            ...  # each step, after the denoiser ran:
            confidence = probe.confidence((h, w), batch_size)  # (B, 1, h, w) in [0, 1], or None
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | None = None,
        *,
        max_queries: int = 256,
        max_heads: int = 4,
        ema: float = 0.0,
        cfg_batched: bool | Callable[[], bool] | Literal["auto"] = "auto",
        cfg_order: Literal["uncond_cond", "cond_uncond"] = "uncond_cond",
    ):
        if max_queries < 1 or max_heads < 1:
            raise ValueError(f"max_queries and max_heads must be >= 1, got {max_queries}, {max_heads}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        if cfg_order not in ("uncond_cond", "cond_uncond"):
            raise ValueError(f"cfg_order must be 'uncond_cond' or 'cond_uncond', got {cfg_order!r}")
        if isinstance(cfg_batched, str) and cfg_batched != "auto":
            raise ValueError(f"cfg_batched must be a bool, a callable or 'auto', got {cfg_batched!r}")
        self.model = model
        self.layers: list[ProbeLayer] = select_layers(model, layers)
        self.max_queries = int(max_queries)
        self.max_heads = int(max_heads)
        self.ema = float(ema)
        self.cfg_batched = cfg_batched
        self.cfg_order = cfg_order
        # (B, 1, H, W) normalised entropy behind the last confidence map, for diagnostics.
        self.last_entropy: Tensor | None = None
        # why the last confidence() call returned None (None after a map was returned)
        self.last_problem: str | None = None
        self.overhead_seconds = 0.0  # host time spent inside the probe (measuring, mapping), for benchmarks
        self._signature = inspect.signature(model.forward)
        self._handles: list = []
        self._taps: list[tuple[str, _SDPATap]] = []
        self._state = _StepState()
        self._ema_state: Tensor | None = None
        self._warned: set[str] = set()
        self._index_cache: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}
        self._ids_cache: tuple[Tensor, tuple[int, int] | str] | None = None

    # -- public API -------------------------------------------------------------------------------------------

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    @property
    def records(self) -> dict[str, LayerRecord]:
        """Records of the step in progress (consumed by :meth:`confidence`). With ``cfg_batched="auto"`` the
        layers' samples are not measured yet: this measures every row of them (diagnostics; confidence() measures
        the conditional half only)."""
        return {
            name: record.measure() if isinstance(record, _Sampled) else record
            for name, record in self._state.records.items()
        }

    def install(self) -> AttentionEntropyProbe:
        if self.installed:
            return self
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_pre, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._on_model_post, always_call=True))
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_pre_hook(partial(self._on_layer_pre, layer)))
            self._handles.append(
                layer.module.register_forward_hook(partial(self._on_layer_post, layer), always_call=True)
            )
        return self

    def remove(self) -> None:
        while self._taps:
            self._taps.pop()[1].__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.reset()

    def reset(self, keep_pending: bool = False) -> None:
        """Forget the EMA state and the step in progress (call when a new sampling run starts).

        ``keep_pending=True`` keeps what the denoiser forward just captured: integrations that notice a new run
        only at its first scheduler step (after that step's forward) use it so step 0 still has a map."""
        if not keep_pending:
            self._state = _StepState()
        self._ema_state = None
        self.last_entropy = None
        self.last_problem = None
        self._ids_cache = None

    def __enter__(self) -> AttentionEntropyProbe:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def confidence(self, latent_hw: tuple[int, int], batch_size: int | None = None) -> Tensor | None:
        """Confidence map (B, 1, H, W) in [0, 1] (fp32) for the step just run, or None (with a warning, once).

        Consumes the step: the next denoiser forward starts a new one.
        """
        if not self.installed:
            raise RuntimeError("AttentionEntropyProbe.confidence() called before install()")
        if batch_size is None and self.cfg_batched == "auto":
            raise ValueError("cfg_batched='auto' needs the latent batch_size to tell a CFG batch apart")
        state, self._state = self._state, _StepState()
        started = time.perf_counter()
        try:
            return self._confidence(state, (int(latent_hw[0]), int(latent_hw[1])), batch_size)
        finally:
            self.overhead_seconds += time.perf_counter() - started

    # -- step bookkeeping ---------------------------------------------------------------------------------------

    def _confidence(
        self, state: _StepState, latent_hw: tuple[int, int], batch_size: int | None
    ) -> Tensor | None:
        self.last_problem = None
        if not state.forward_seen:
            return self._fallback(
                "no-forward",
                "no denoiser forward ran since the last step",
                "AttentionEntropyProbe: no denoiser forward pass ran since the last confidence() call. ",
            )
        missing = [name for name in self.layer_names if name not in state.records]
        if missing:
            reasons = [
                f"{name}: {state.problems.get(name, 'no scaled_dot_product_attention call seen')}"
                for name in missing
            ]
            return self._fallback(
                "missing",
                # no parentheses inside: integrations wrap the reason in "structure (fallback: ...)"
                f"{len(missing)} of {len(self.layers)} probed layers recorded nothing, e.g. {reasons[0]}",
                f"AttentionEntropyProbe: {len(missing)} of {len(self.layers)} probed layers recorded nothing in "
                f"this step ({'; '.join(reasons)}). The usual cause is an attention backend or processor that "
                "bypasses torch.nn.functional.scaled_dot_product_attention (flash-attn, sage, xformers, "
                "AttnProcessor). ",
            )
        records = [self._conditional(state.records[name], batch_size) for name in self.layer_names]
        entropy = torch.stack([record.entropy_map(latent_hw) for record in records]).mean(dim=0)
        if batch_size is not None and entropy.shape[0] != batch_size:
            return self._fallback(
                "batch",
                f"the probed layers saw {entropy.shape[0]} samples, the latent batch has {batch_size}",
                f"AttentionEntropyProbe: the probed layers saw {entropy.shape[0]} samples but the latent batch has "
                f"{batch_size} (cfg_batched={self.cfg_batched!r}, cfg_order={self.cfg_order!r}). ",
            )
        if self.ema > 0 and self._ema_state is not None and self._ema_state.shape == entropy.shape:
            entropy = self.ema * self._ema_state + (1.0 - self.ema) * entropy
        self._ema_state = entropy
        self.last_entropy = entropy
        return entropy_to_confidence(entropy)

    def _fallback(self, key: str, reason: str, message: str) -> None:
        """No map for this step: remember why (``last_problem``) and warn once per kind."""
        self.last_problem = reason
        self._warn_once(key, message + FALLBACK_HINT, stacklevel=5)  # the caller of confidence()
        return None

    def _warn_once(self, key: str, message: str, stacklevel: int = 4) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)

    def _read_cfg_batched(self) -> bool | None:
        if self.cfg_batched == "auto":
            return None
        return bool(self.cfg_batched() if callable(self.cfg_batched) else self.cfg_batched)

    def _cond_half(self, start: int, stop: int) -> tuple[int, int]:
        half = start + (stop - start) // 2
        return (half, stop) if self.cfg_order == "uncond_cond" else (start, half)

    def _conditional(self, record: LayerRecord | _Sampled, batch_size: int | None) -> LayerRecord:
        """cfg_batched="auto": measure only the conditional half iff the layer saw twice the latent batch."""
        if isinstance(record, LayerRecord):
            return record
        if batch_size is not None and record.rows == 2 * batch_size:
            return record.measure(*self._cond_half(0, record.rows))
        return record.measure()

    # -- hooks ----------------------------------------------------------------------------------------------------

    def _on_model_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        state = self._state
        # A later forward of the same step (e.g. the unconditional branch run separately) is not read.
        if state.forward_seen:
            state.capturing = False
            return
        started = time.perf_counter()
        state.forward_seen = True
        state.capturing = True
        state.context = self._read_context(args, kwargs)
        self.overhead_seconds += time.perf_counter() - started

    def _on_model_post(self, module: nn.Module, args: tuple, output) -> None:
        self._state.capturing = False

    def _on_layer_pre(self, layer: ProbeLayer, module: nn.Module, args: tuple) -> None:
        state = self._state
        if state.capturing and layer.name not in state.records:
            tap = _SDPATap(partial(self._on_sdpa, layer))
            tap.__enter__()
            self._taps.append((layer.name, tap))

    def _on_layer_post(self, layer: ProbeLayer, module: nn.Module, args: tuple, output) -> None:
        if self._taps and self._taps[-1][0] == layer.name:
            self._taps.pop()[1].__exit__(None, None, None)

    def _on_sdpa(self, layer: ProbeLayer, call: dict) -> None:
        state = self._state
        if layer.name in state.records:  # first SDPA call of the layer only (IP-adapter processors add more)
            return
        started = time.perf_counter()
        try:
            with torch.no_grad():
                result = self._measure(layer, call, state.context)
        except Exception as exc:  # a probe failure must not break generation; confidence() reports it
            result = f"probe failed: {exc!r}"
        if isinstance(result, (LayerRecord, _Sampled)):
            state.records[layer.name] = result
            state.problems.pop(layer.name, None)
        else:
            state.problems[layer.name] = result
        self.overhead_seconds += time.perf_counter() - started

    # -- measuring --------------------------------------------------------------------------------------------------

    def _read_context(self, args: tuple, kwargs: dict) -> _ForwardContext:
        try:
            arguments = self._signature.bind_partial(*args, **kwargs).arguments
        except TypeError as exc:
            return _ForwardContext(problem=f"cannot read the denoiser inputs ({exc})")
        latent = arguments.get("sample", arguments.get("hidden_states"))
        if not isinstance(latent, Tensor):
            return _ForwardContext(problem="the denoiser input has no 'sample' or 'hidden_states' tensor")
        if latent.ndim == 4:
            base_hw: tuple[int, int] | str = (int(latent.shape[-2]), int(latent.shape[-1]))
        elif latent.ndim == 3 and isinstance(arguments.get("img_ids"), Tensor):
            base_hw = self._grid_from_ids(arguments["img_ids"], int(latent.shape[1]))
        else:
            return _ForwardContext(
                problem=f"cannot tell the token grid of a {tuple(latent.shape)} denoiser input"
            )
        if isinstance(base_hw, str):
            return _ForwardContext(problem=base_hw)
        text = arguments.get("encoder_hidden_states")
        text_tokens = int(text.shape[1]) if isinstance(text, Tensor) and text.ndim == 3 else 0
        return _ForwardContext(base_hw=base_hw, text_tokens=text_tokens, cfg_batched=self._read_cfg_batched())

    def _grid_from_ids(self, img_ids: Tensor, num_tokens: int) -> tuple[int, int] | str:
        """Flux packed latents: img_ids[i] = (0, row, col) of token i. Cached per ids tensor (one host sync)."""
        if self._ids_cache is not None and self._ids_cache[0] is img_ids:
            return self._ids_cache[1]
        ids = (img_ids[0] if img_ids.ndim == 3 else img_ids).round().long()
        rows, cols = ids[:, 1] - ids[:, 1].min(), ids[:, 2] - ids[:, 2].min()
        h, w = int(rows.max()) + 1, int(cols.max()) + 1
        index = torch.arange(ids.shape[0], device=ids.device)
        row_major = ids.shape[0] == h * w == num_tokens and bool(
            torch.equal(rows, index // w) and torch.equal(cols, index % w)
        )
        grid: tuple[int, int] | str = (
            (h, w)
            if row_major
            else f"img_ids do not describe a row-major grid of the {num_tokens} image tokens"
        )
        self._ids_cache = (img_ids, grid)
        return grid

    def _indices(
        self, device: torch.device, grid: tuple[int, int], offset: int, heads: int, kv_heads: int
    ) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
        sample_hw = query_sample_grid(*grid, self.max_queries)
        key = (device, grid, offset, heads, kv_heads, sample_hw)
        if key not in self._index_cache:
            rows = centered_positions(grid[0], sample_hw[0], device)
            cols = centered_positions(grid[1], sample_hw[1], device)
            token_index = offset + (rows[:, None] * grid[1] + cols[None, :]).flatten()
            head_index = centered_positions(heads, min(self.max_heads, heads), device)
            kv_head_index = head_index // (heads // kv_heads)  # grouped-query attention shares key heads
            self._index_cache[key] = (token_index, head_index, kv_head_index)
        return (*self._index_cache[key], sample_hw)

    def _measure(
        self, layer: ProbeLayer, call: dict, context: _ForwardContext
    ) -> LayerRecord | _Sampled | str:
        if context.problem is not None:
            return context.problem
        query, key, mask = call["query"], call["key"], call.get("attn_mask")
        if query.ndim != 4 or key.ndim != 4:
            return (
                f"unexpected q/k shapes {tuple(query.shape)}, {tuple(key.shape)} (want (B, heads, seq, dim))"
            )
        if call.get("is_causal", False):
            return "causal attention is not image self-attention"
        batch, heads, seq, _ = query.shape
        if key.shape[-2] != seq:
            return f"{key.shape[-2]} keys for {seq} queries: cross-attention, not self-attention"
        if heads % key.shape[1]:
            return f"{heads} query heads do not group over {key.shape[1]} key heads"
        image_tokens = seq if layer.layout == "self" else seq - context.text_tokens
        grid = token_grid(image_tokens, context.base_hw) if image_tokens > 0 else None
        if grid is None:
            return f"{image_tokens} image tokens fit no grid of the {context.base_hw} denoiser input"
        offset = seq - image_tokens if layer.layout == "text_first" else 0
        start, stop = 0, batch
        if context.cfg_batched:
            if batch % 2:
                return f"cfg_batched is set but the attention batch ({batch}) is odd"
            start, stop = self._cond_half(0, batch)
        token_index, head_index, kv_head_index, sample_hw = self._indices(
            query.device, grid, offset, heads, key.shape[1]
        )
        # Select before copying anything: one gather of the sampled (head, query) pairs.
        q = query[start:stop][:, head_index[:, None], token_index[None, :]]
        k = key[start:stop].index_select(1, kv_head_index)
        if mask is not None:
            mask = select_attention_mask(mask, (start, stop), head_index, token_index)
        sampled = _Sampled(
            name=layer.name,
            query=q,
            key=k,
            mask=mask,
            scale=call.get("scale"),
            grid_hw=grid,
            sample_hw=sample_hw,
            token_index=token_index,
            head_index=head_index,
            first_row=start,
        )
        if context.cfg_batched is None:  # "auto": confidence() measures the rows it keeps
            return sampled
        return sampled.measure()
