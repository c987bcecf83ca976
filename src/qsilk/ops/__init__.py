"""Pure tensor operators of QSilk. They import nothing but torch.

All take and return (B, C, H, W) tensors (micro_clamp: any (B, ...)), keep dtype and device, compute statistics
in fp32, are batch-independent, leave in-corridor values bit-identical and reject non-finite input.
"""

from .aqclip import (
    apply_corridor,
    aqclip,
    aqclip_corridor,
    auto_tile,
    conditional_corridor,
    resize_confidence,
    resolve_tile,
    tile_starts,
)
from .clamp import micro_clamp, micro_clamp_bounds
from .confidence import gradient_energy, structure_confidence
from .detail import binomial_blur, edge_gate, highpass, restore_high_frequencies
from .quantile import tail_quantiles
from .saturate import soft_clip

__all__ = [
    "apply_corridor",
    "aqclip",
    "aqclip_corridor",
    "auto_tile",
    "binomial_blur",
    "conditional_corridor",
    "edge_gate",
    "highpass",
    "gradient_energy",
    "micro_clamp",
    "micro_clamp_bounds",
    "resize_confidence",
    "resolve_tile",
    "restore_high_frequencies",
    "soft_clip",
    "structure_confidence",
    "tail_quantiles",
    "tile_starts",
]
