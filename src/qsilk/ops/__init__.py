"""Pure tensor operators of QSilk. They import nothing but torch.

All take and return (B, C, H, W) tensors (micro_clamp: any (B, ...)), keep dtype and device, compute statistics
in fp32, are batch-independent, leave in-corridor values bit-identical and reject non-finite input.
"""

from .aqclip import apply_corridor, aqclip, aqclip_corridor, resize_confidence, tile_starts
from .clamp import micro_clamp, micro_clamp_bounds
from .confidence import gradient_energy, structure_confidence
from .quantile import tail_quantiles
from .saturate import soft_clip

__all__ = [
    "apply_corridor",
    "aqclip",
    "aqclip_corridor",
    "gradient_energy",
    "micro_clamp",
    "micro_clamp_bounds",
    "resize_confidence",
    "soft_clip",
    "structure_confidence",
    "tail_quantiles",
    "tile_starts",
]
