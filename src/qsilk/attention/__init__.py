"""Attention-entropy confidence (issue 4): a probe that reads q/k inside chosen self-attention layers of a diffusers
denoiser and turns the entropy of their attention rows into a (B, 1, H, W) confidence map in [0, 1].

    from qsilk.attention import AttentionEntropyProbe

    with AttentionEntropyProbe(pipe.unet, cfg_batched=lambda: pipe.do_classifier_free_guidance) as probe:
        ...  # per step, after the denoiser ran:
        confidence = probe.confidence(latent_hw, batch_size)  # or None (warned once) -> use the structure proxy
"""

from qsilk.attention.entropy import attention_entropy, entropy_to_confidence, token_grid
from qsilk.attention.layers import default_layer_names, select_layers
from qsilk.attention.probe import AttentionEntropyProbe, LayerRecord

__all__ = [
    "AttentionEntropyProbe",
    "LayerRecord",
    "attention_entropy",
    "default_layer_names",
    "entropy_to_confidence",
    "select_layers",
    "token_grid",
]
