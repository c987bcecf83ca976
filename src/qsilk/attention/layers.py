"""Which attention layers the probe reads, and how their token sequence is laid out, per architecture.

Attention modules are found by duck typing (diffusers' ``Attention`` and ``AttentionModuleMixin`` modules both
carry a ``processor`` and ``set_processor``), so this module needs no diffusers import.

Token layouts at the ``scaled_dot_product_attention`` call:
- ``"self"``: every token is an image token (UNet attn1, DiT / PixArt attn1, SD3.5 dual ``attn2``).
- ``"image_first"``: [image, text] (SD3 joint attention: ``JointAttnProcessor2_0`` concatenates context last).
- ``"text_first"``: [text, image] (Flux double blocks concatenate context first; Flux single blocks receive the
  already concatenated [text, image] sequence).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from torch import nn

T = TypeVar("T")
Layout = Literal["self", "image_first", "text_first"]

UNET_CLASSES = ("UNet2DConditionModel", "UNet2DModel")
SD3_CLASSES = ("SD3Transformer2DModel",)
FLUX_CLASSES = ("FluxTransformer2DModel",)
DIT_CLASSES = ("DiTTransformer2DModel", "PixArtTransformer2DModel", "Transformer2DModel")

MAX_DEFAULT_UNET_LAYERS = 8
DEFAULT_TRANSFORMER_BLOCKS = 3


@dataclass(frozen=True)
class ProbeLayer:
    name: str
    module: nn.Module
    layout: Layout


def is_attention(module: nn.Module) -> bool:
    return hasattr(module, "processor") and callable(getattr(module, "set_processor", None))


def is_cross_attention(module: nn.Module) -> bool:
    return bool(getattr(module, "is_cross_attention", False))


def has_joint_context(module: nn.Module) -> bool:
    """A joint-attention module projects the text context itself (SD3 ``attn``, Flux double-block ``attn``)."""
    return getattr(module, "add_q_proj", None) is not None


def architecture(model: nn.Module) -> str:
    name = type(model).__name__
    for family, classes in (
        ("unet", UNET_CLASSES),
        ("sd3", SD3_CLASSES),
        ("flux", FLUX_CLASSES),
        ("dit", DIT_CLASSES),
    ):
        if name in classes:
            return family
    return "unknown"


def layer_layout(model: nn.Module, name: str, module: nn.Module) -> Layout:
    family = architecture(model)
    if family == "flux":
        return "text_first"
    if family == "sd3" and has_joint_context(module):
        return "image_first"
    if has_joint_context(module):
        raise ValueError(
            f"layer {name!r} of {type(model).__name__} is a joint text+image attention whose token order the probe "
            "does not know; supported joint architectures: SD3Transformer2DModel, FluxTransformer2DModel"
        )
    return "self"


def self_attention_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_attention(m) and not is_cross_attention(m)]


def _spread(items: Sequence[T], count: int) -> list[T]:
    """``count`` items evenly spread over ``items`` (all of them if there are fewer)."""
    if len(items) <= count:
        return list(items)
    return [items[int((i + 0.5) * len(items) / count)] for i in range(count)]


def _block_index(name: str, prefix: str) -> int | None:
    match = re.match(rf"{re.escape(prefix)}\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def _middle_blocks(names: Sequence[str], prefix: str, count: int, suffix: str) -> list[str]:
    """Layers ``prefix.<i>.<suffix>`` for ``count`` block indices evenly spread over the middle half of the stack."""
    by_block = {
        _block_index(n, prefix): n
        for n in names
        if n.endswith(suffix) and _block_index(n, prefix) is not None
    }
    blocks = sorted(by_block)
    if not blocks:
        return []
    lo, hi = len(blocks) // 4, len(blocks) - len(blocks) // 4
    return [by_block[b] for b in _spread(blocks[lo:hi], count)]


def default_layer_names(model: nn.Module) -> list[str]:
    """Default probed layers per architecture.

    - UNet: self-attention (attn1) of the mid block and of the lowest-resolution up-block that has attention, at
      most 8 (spread evenly; SDXL has 40 such layers).
    - SD3: the joint ``attn`` of 3 blocks spread over the middle half of the stack.
    - Flux: the ``attn`` of 2 double blocks and 2 single blocks from the middle half of each stack.
    - DiT / PixArt: ``attn1`` of 3 middle blocks.
    """
    family = architecture(model)
    names = self_attention_names(model)
    if family == "unet":
        mid = [n for n in names if n.startswith("mid_block.")]
        up_blocks = sorted({b for n in names if (b := _block_index(n, "up_blocks")) is not None})
        lowest_up = [n for n in names if up_blocks and _block_index(n, "up_blocks") == up_blocks[0]]
        chosen = _spread(mid + lowest_up, MAX_DEFAULT_UNET_LAYERS)
    elif family == "sd3":
        chosen = _middle_blocks(names, "transformer_blocks", DEFAULT_TRANSFORMER_BLOCKS, ".attn")
    elif family == "flux":
        chosen = _middle_blocks(names, "transformer_blocks", 2, ".attn")
        chosen += _middle_blocks(names, "single_transformer_blocks", 2, ".attn")
    elif family == "dit":
        chosen = _middle_blocks(names, "transformer_blocks", DEFAULT_TRANSFORMER_BLOCKS, ".attn1")
    else:
        raise ValueError(
            f"no default attention layers for {type(model).__name__}; pass layers=[...] (module name patterns)"
        )
    if not chosen:
        raise ValueError(f"found no self-attention layer to probe in {type(model).__name__}")
    return chosen


def select_layers(model: nn.Module, patterns: Sequence[str] | None = None) -> list[ProbeLayer]:
    """Resolve ``patterns`` (fnmatch globs over module names; None = the architecture default) to probe layers.

    A pattern naming an attention module selects it; a pattern naming a container selects every self-attention
    module inside it. A pattern that directly names a cross-attention module, or selects nothing, is an error.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    modules = dict(model.named_modules())
    attention = {n: m for n, m in modules.items() if is_attention(m)}
    if patterns is None:
        chosen = default_layer_names(model)
    else:
        chosen = []
        for pattern in patterns:
            direct = [n for n in attention if fnmatch.fnmatchcase(n, pattern)]
            crossed = [n for n in direct if is_cross_attention(attention[n])]
            if crossed:
                raise ValueError(
                    f"layer pattern {pattern!r} selects cross-attention layers {crossed[:3]}; the probe reads "
                    "self-attention only (UNet: use '*.attn1')"
                )
            inside = [
                n
                for n in attention
                if not is_cross_attention(attention[n]) and fnmatch.fnmatchcase(n, pattern + ".*")
            ]
            matched = direct + inside
            if not matched:
                raise ValueError(f"layer pattern {pattern!r} matches no self-attention module")
            chosen += [n for n in matched if n not in chosen]
        chosen.sort(key=list(attention).index)
    return [ProbeLayer(n, attention[n], layer_layout(model, n, attention[n])) for n in chosen]
