"""Inject QRM deltas into a diffusers transformer with forward hooks (tomesd style ``attach`` / ``detach``).

Per transformer call: a forward pre-hook on the transformer reads the timestep, the condition and x_t; as soon as
the conditioning embedding exists (DiT: each block's own timestep+label embedding, computed up front; SD3/Flux:
the output of ``time_text_embed``; PixArt: the output of ``adaln_single``), every head's baseline vector is
computed, QRM runs once and the deltas are stored. A forward hook on each head's adaLN ``linear`` then returns
``output + delta`` for the rows that get one (PixArt: a pre-hook on each block adds it to the block's
``timestep`` input). The model's own call of each head linear (and of DiT's per-block embedders) gets the result
computed for QRM back instead of recomputing it, when its inputs are exactly (``torch.equal``) the ones it came
from: reading every adaLN weight a second time is what made QRM cost 2-3 % of a DiT-XL step (memory-bound), not
QRM itself. Outside the active window, when disabled or with the QRM's output exactly zero where it
matters, the hooks return None and the model computes exactly what it computes without them; ``detach`` removes
every hook.
"""

from __future__ import annotations

import inspect
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .heads import backbone_family
from .module import QRM

_ATTR = "_qsilk_qrm_handle"


def _transformer_of(pipe_or_model) -> nn.Module:
    model = getattr(pipe_or_model, "transformer", pipe_or_model)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"attach() needs a diffusers pipeline with a .transformer or a transformer, got {type(pipe_or_model).__name__}"
        )
    return model


class QRMHandle:
    """Returned by :func:`attach`; a context manager. ``enabled`` switches the deltas off without detaching;
    ``progress`` (when set) overrides the schedule position derived from the pipeline's scheduler (trainers set it);
    ``last_deltas`` holds the deltas of the last call; ``calls`` / ``active_calls`` count transformer calls."""

    def __init__(
        self,
        transformer: nn.Module,
        qrm: QRM,
        pipe=None,
        *,
        window=None,
        apply_to_uncond=None,
        cfg_order=None,
    ):
        config = qrm.config
        config.check_backbone(transformer)
        self.transformer = transformer
        self.qrm = qrm
        self.pipe = pipe
        self.family = backbone_family(transformer)
        self.heads = config.heads
        self.window = tuple(window) if window is not None else tuple(config.window)
        if len(self.window) != 2 or not 0.0 <= self.window[0] <= self.window[1] <= 1.0:
            raise ValueError(f"window must be (start, end) with 0 <= start <= end <= 1, got {self.window}")
        self.apply_to_uncond = config.apply_to_uncond if apply_to_uncond is None else bool(apply_to_uncond)
        order = cfg_order or config.cfg_order
        if order == "auto":
            order = getattr(pipe, "cfg_order", "uncond_cond")
        if order not in ("uncond_cond", "cond_uncond"):
            raise ValueError(f"cfg_order must be 'uncond_cond' or 'cond_uncond', got {order!r}")
        self.cfg_order = order
        self.enabled = True
        self.progress: float | None = None
        self.last_deltas: list[Tensor] | None = None
        self.calls = 0
        self.active_calls = 0
        self._deltas: list[Tensor] | None = None
        self._mask: Tensor | None = None
        self._ctx: dict | None = None
        self._reuse: dict[int, tuple] = {}  # id(module) -> (args, kwargs, output) computed in this call
        self._swapped: list[tuple[nn.Module, object]] = []
        self._warned = False
        self._signature = inspect.signature(transformer.forward)
        self._hooks: list = []
        self._install()

    # -- installation ------------------------------------------------------------------------------------------

    def _install(self) -> None:
        t = self.transformer
        self._hooks.append(t.register_forward_pre_hook(self._on_call, with_kwargs=True))
        self._hooks.append(t.register_forward_hook(self._on_return))
        modules = dict(t.named_modules())
        self._head_modules = [modules[h.name] for h in self.heads]
        if self.family in ("sd3", "flux"):
            self._hooks.append(t.time_text_embed.register_forward_hook(self._on_temb))
        elif self.family == "pixart":
            self._hooks.append(t.adaln_single.register_forward_hook(self._on_adaln_single))
        for k, head in enumerate(self.heads):
            module = modules[head.name]
            if self.family == "pixart":
                self._hooks.append(module.register_forward_pre_hook(self._block_hook(k), with_kwargs=True))
            else:
                self._hooks.append(module.register_forward_hook(self._linear_hook(k)))
                self._swap_forward(module)
        if self.family == "dit":  # the pre-hook also runs each block's timestep + label embedder
            for head in self.heads:
                if head.name != "proj_out_1":
                    self._swap_forward(t.transformer_blocks[int(head.name.split(".")[1])].norm1.emb)

    def _swap_forward(self, module: nn.Module) -> None:
        """Let ``module``'s own call return what the pre-hook computed with it, when called with the same inputs."""
        if any(m is module for m, _ in self._swapped):
            return
        previous = module.__dict__.get("forward")  # an instance-level forward someone else installed, or None
        original = module.forward

        def forward(*args, **kwargs):
            stored = self._reuse.get(id(module))
            if stored is not None and _same(stored[0], args) and _same(stored[1], kwargs):
                return stored[2]
            return original(*args, **kwargs)

        module.forward = forward
        self._swapped.append((module, previous))

    def _computed(self, module: nn.Module, *args, **kwargs) -> Tensor:
        """``module(*args, **kwargs)``, remembered for the model's own call with the same inputs."""
        out = module(*args, **kwargs)
        self._reuse[id(module)] = (args, kwargs, out)
        return out

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for module, previous in reversed(self._swapped):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._swapped.clear()
        self._reuse = {}
        self._deltas = self._mask = self._ctx = None
        if getattr(self.transformer, _ATTR, None) is self:
            delattr(self.transformer, _ATTR)

    def __enter__(self) -> QRMHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- per call ----------------------------------------------------------------------------------------------

    def _current_progress(self, timestep: Tensor) -> float | None:
        if self.progress is not None:
            return float(self.progress)
        timesteps = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        if timesteps is None or len(timesteps) == 0:
            return None
        value = float(timestep.flatten()[0]) * (1000.0 if self.family == "flux" else 1.0)
        index = int(torch.argmin((timesteps.float().cpu() - value).abs()))
        return index / max(len(timesteps) - 1, 1)

    def _is_active(self, timestep: Tensor) -> bool:
        if not self.enabled:
            return False
        if self.window == (0.0, 1.0):
            return True
        progress = self._current_progress(timestep)
        if progress is None:
            if not self._warned:
                warnings.warn(
                    "QRM: no schedule position known (no pipeline scheduler, no handle.progress); the "
                    "active window cannot be applied, QRM acts at every call",
                    stacklevel=3,
                )
                self._warned = True
            return True
        return self.window[0] <= progress <= self.window[1]

    def _on_call(self, module, args, kwargs):
        self._deltas = self._mask = None
        self._reuse = {}
        self.calls += 1
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        hidden = bound.get("hidden_states")
        timestep = bound.get("timestep")
        if hidden is None or timestep is None:
            self._ctx = None
            return None
        batch = hidden.shape[0]
        timestep = torch.as_tensor(timestep, device=hidden.device)
        if timestep.ndim == 0 or timestep.numel() == 1:
            timestep = timestep.reshape(1).expand(batch)
        if not self._is_active(timestep):
            self._ctx = None
            return None
        self._ctx = dict(bound=bound, hidden=hidden, timestep=timestep, batch=batch)
        if self.family == "dit":
            self._prepare_dit()
        return None

    def _on_return(self, module, args, output):
        self._deltas = self._mask = self._ctx = None
        self._reuse = {}
        return None

    def _rows_with_delta(self, bound: dict, hidden: Tensor) -> Tensor:
        batch = hidden.shape[0]
        every = torch.ones(batch, dtype=torch.bool, device=hidden.device)
        if self.apply_to_uncond:
            return every
        if self.family == "dit":
            labels = bound.get("class_labels")
            null_id = self.transformer.transformer_blocks[0].norm1.emb.class_embedder.num_classes
            return torch.as_tensor(labels, device=hidden.device).reshape(-1).expand(batch) != null_id
        do_cfg = getattr(self.pipe, "do_classifier_free_guidance", None)
        if do_cfg is None:  # e.g. PixArt: the CFG batch repeats the latents
            half = batch // 2
            do_cfg = batch % 2 == 0 and batch > 0 and torch.equal(hidden[:half], hidden[half:])
        if not do_cfg or batch % 2:
            return every
        first_half = torch.arange(batch, device=hidden.device) < batch // 2
        return ~first_half if self.cfg_order == "uncond_cond" else first_half

    def _xt(self, hidden: Tensor) -> Tensor | None:
        if not self.qrm.config.xt_channels:
            return None
        if hidden.ndim == 3:  # packed tokens (Flux): (B, N, C) -> a square grid when possible
            b, n, c = hidden.shape
            side = int(round(n**0.5))
            grid = hidden.transpose(1, 2)
            return grid.reshape(b, c, side, side) if side * side == n else grid.reshape(b, c, 1, n)
        return hidden

    def _run_qrm(self, baselines: list[Tensor], timestep_unit: Tensor, cond: Tensor | None) -> None:
        ctx = self._ctx
        self._mask = self._rows_with_delta(ctx["bound"], ctx["hidden"])
        deltas = self.qrm(timestep_unit, cond, baselines, self._xt(ctx["hidden"]))
        self._deltas = deltas
        self.last_deltas = deltas
        self.active_calls += 1

    def _timestep_unit(self, timestep: Tensor) -> Tensor:
        # Flux pipelines pass t / 1000 already; the others pass t on the 0..1000 scale.
        return timestep.float() if self.family == "flux" else timestep.float() / 1000.0

    def _prepare_dit(self) -> None:
        ctx = self._ctx
        t = self.transformer
        labels = torch.as_tensor(ctx["bound"]["class_labels"], device=ctx["hidden"].device).reshape(-1)
        labels = labels.expand(ctx["batch"])
        dtype = ctx["hidden"].dtype
        baselines = []
        first_emb = None
        for head in self.heads:
            if head.name == "proj_out_1":
                emb = first_emb
                linear = t.proj_out_1
            else:
                block = t.transformer_blocks[int(head.name.split(".")[1])]
                emb = self._computed(block.norm1.emb, ctx["timestep"], labels, hidden_dtype=dtype)
                linear = block.norm1.linear
                first_emb = emb if first_emb is None else first_emb
            baselines.append(self._computed(linear, F.silu(emb)))
        cond = t.transformer_blocks[0].norm1.emb.class_embedder.embedding_table(labels)
        self._run_qrm(baselines, self._timestep_unit(ctx["timestep"]), cond)

    def _on_temb(self, module, args, temb):
        if self._ctx is None:
            return None
        act = F.silu(temb)
        baselines = [self._computed(module, act) for module in self._head_modules]
        pooled = self._ctx["bound"].get("pooled_projections")
        self._run_qrm(baselines, self._timestep_unit(self._ctx["timestep"]), pooled)
        return None

    def _on_adaln_single(self, module, args, output):
        if self._ctx is None:
            return None
        modulation = output[0]
        batch = modulation.shape[0]
        baselines = []
        for block in self._head_modules:
            baselines.append(
                (block.scale_shift_table[None] + modulation.reshape(batch, 6, -1)).reshape(batch, -1)
            )
        text = self._ctx["bound"].get("encoder_hidden_states")
        mask = self._ctx["bound"].get("encoder_attention_mask")
        cond = None
        if text is not None:
            if mask is not None and mask.ndim == 2:
                weights = mask.to(text.dtype)[..., None]
                cond = (text * weights).sum(1) / weights.sum(1).clamp_min(1.0)
            else:
                cond = text.mean(1)
        self._run_qrm(baselines, self._timestep_unit(self._ctx["timestep"]), cond)
        return None

    def _add(self, k: int, value: Tensor) -> Tensor | None:
        delta = self._deltas[k]
        mask = self._mask
        if delta.shape[0] != value.shape[0]:
            raise RuntimeError(
                f"QRM: head {self.heads[k].name} saw batch {value.shape[0]}, expected {delta.shape[0]}"
            )
        return torch.where(mask[:, None], value + delta.to(value.dtype), value)

    def _linear_hook(self, k: int):
        def hook(module, args, output):
            if self._deltas is None:
                return None
            return self._add(k, output)

        return hook

    def _block_hook(self, k: int):
        def hook(module, args, kwargs):
            if self._deltas is None:
                return None
            if "timestep" in kwargs and kwargs["timestep"] is not None:
                kwargs = dict(kwargs, timestep=self._add(k, kwargs["timestep"]))
                return args, kwargs
            if len(args) > 4:  # gradient checkpointing passes the block's arguments positionally
                args = list(args)
                args[4] = self._add(k, args[4])
                return tuple(args), kwargs
            raise RuntimeError("QRM: could not find the PixArt block's timestep argument")

        return hook


def _same(a, b) -> bool:
    """Exactly the same call inputs: tensors equal in shape, dtype and every value; anything else by ``==``."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and torch.equal(a, b)
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def attach(
    pipe_or_transformer,
    qrm: QRM,
    *,
    window=None,
    apply_to_uncond: bool | None = None,
    cfg_order: str | None = None,
) -> QRMHandle:
    """Hook ``qrm`` into the pipeline's transformer (or a bare transformer). Raises ``ValueError`` if the QRM was
    built for another backbone, ``RuntimeError`` if one is already attached. Returns the handle (a context
    manager: leaving the with-block detaches)."""
    transformer = _transformer_of(pipe_or_transformer)
    if getattr(transformer, _ATTR, None) is not None:
        raise RuntimeError("a QRM is already attached to this transformer; detach() it first")
    pipe = pipe_or_transformer if pipe_or_transformer is not transformer else None
    qrm = qrm.to(device=next(transformer.parameters()).device)
    handle = QRMHandle(
        transformer, qrm, pipe, window=window, apply_to_uncond=apply_to_uncond, cfg_order=cfg_order
    )
    setattr(transformer, _ATTR, handle)
    return handle


def detach(pipe_or_transformer) -> None:
    """Remove every QRM hook; the transformer is exactly as before :func:`attach`. No-op if none is attached."""
    transformer = _transformer_of(pipe_or_transformer)
    handle = getattr(transformer, _ATTR, None)
    if handle is not None:
        handle.remove()


def attached(pipe_or_transformer) -> QRMHandle | None:
    return getattr(_transformer_of(pipe_or_transformer), _ATTR, None)
