"""adaLN heads of diffusers DiT families: where each modulation vector is made and what its chunks mean.

A *head* is one modulation vector per sample, ``m_k`` of shape (B, n_k * d_k), cut by the model into n_k chunks
of width d_k (shift / scale / gate ...). QRM adds one delta per head to ``m_k`` before the chunking.

Chunk orders are the ones diffusers uses (0.42):

- ``AdaLayerNormZero`` (DiT, SD3, Flux double blocks): shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
- ``SD35AdaLayerNormZeroX`` (SD3.5 dual-attention blocks): the six above + shift_msa2, scale_msa2, gate_msa2
- ``AdaLayerNormZeroSingle`` (Flux single blocks): shift, scale, gate
- ``AdaLayerNormContinuous`` (SD3/Flux ``norm_out``, SD3's last ``norm1_context``): **scale, shift** (scale first)
- ``DiTTransformer2DModel.proj_out_1``: shift, scale (shift first)
- PixArt blocks (``ada_norm_single``): the per-block vector ``scale_shift_table[i] + adaln_single.linear(t)``,
  six chunks in the ``AdaLayerNormZero`` order. PixArt's output modulation has no Linear (a table plus the raw
  time embedding added to shift and scale alike) and is not a QRM head.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from torch import nn

ZERO6 = ("shift", "scale", "gate", "shift", "scale", "gate")
ZERO9 = ZERO6 + ("shift", "scale", "gate")
SINGLE3 = ("shift", "scale", "gate")
CONTINUOUS2 = ("scale", "shift")  # diffusers' AdaLayerNormContinuous: scale before shift
DIT_OUT2 = ("shift", "scale")  # DiTTransformer2DModel.proj_out_1
ROLES = ("shift", "scale", "gate")

FAMILIES = {
    "DiTTransformer2DModel": "dit",
    "PixArtTransformer2DModel": "pixart",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
}


class UnsupportedBackboneError(TypeError):
    """The transformer class has no known adaLN head layout."""


@dataclass(frozen=True)
class HeadSpec:
    """One adaLN head: ``name`` is the dotted path of the module whose output is the modulation vector (the
    adaLN ``linear``; for PixArt the transformer block whose ``timestep`` input is modulated)."""

    name: str
    roles: tuple[str, ...]
    dim: int

    @property
    def width(self) -> int:
        return len(self.roles) * self.dim

    def chunk_slice(self, index: int) -> slice:
        return slice(index * self.dim, (index + 1) * self.dim)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["roles"] = list(self.roles)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> HeadSpec:
        return cls(name=str(d["name"]), roles=tuple(str(r) for r in d["roles"]), dim=int(d["dim"]))


def backbone_family(transformer: nn.Module) -> str:
    name = type(transformer).__name__
    if name not in FAMILIES:
        raise UnsupportedBackboneError(
            f"QRM supports {sorted(FAMILIES)}; got {name}. (UNet models have no adaLN heads.)"
        )
    return FAMILIES[name]


def _linear_roles(module: nn.Module) -> tuple[str, ...] | None:
    from diffusers.models.normalization import (
        AdaLayerNormContinuous,
        AdaLayerNormZero,
        AdaLayerNormZeroSingle,
        SD35AdaLayerNormZeroX,
    )

    if isinstance(module, SD35AdaLayerNormZeroX):
        return ZERO9
    if isinstance(module, AdaLayerNormZero):
        return ZERO6
    if isinstance(module, AdaLayerNormZeroSingle):
        return SINGLE3
    if isinstance(module, AdaLayerNormContinuous):
        return CONTINUOUS2
    return None


def discover_heads(transformer: nn.Module) -> list[HeadSpec]:
    """All adaLN heads of a supported transformer, in module order (which is the order they run in)."""
    family = backbone_family(transformer)
    heads: list[HeadSpec] = []
    if family == "pixart":
        for i, block in enumerate(transformer.transformer_blocks):
            heads.append(HeadSpec(f"transformer_blocks.{i}", ZERO6, int(block.scale_shift_table.shape[-1])))
        return heads
    for name, module in transformer.named_modules():
        roles = _linear_roles(module)
        if roles is None:
            continue
        linear = module.linear
        dim = linear.out_features // len(roles)
        if dim * len(roles) != linear.out_features:
            raise ValueError(
                f"{name}.linear has {linear.out_features} outputs, not a multiple of {len(roles)}"
            )
        heads.append(HeadSpec(f"{name}.linear", roles, dim))
    if family == "dit":
        linear = transformer.proj_out_1
        heads.append(HeadSpec("proj_out_1", DIT_OUT2, linear.out_features // 2))
    if not heads:
        raise UnsupportedBackboneError(f"no adaLN heads found in {type(transformer).__name__}")
    return heads


def config_hash(transformer: nn.Module) -> str:
    """Hash of the backbone's architecture config (private ``_`` keys, e.g. the diffusers version, excluded)."""
    config = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def backbone_params(transformer: nn.Module) -> int:
    return sum(p.numel() for p in transformer.parameters())
