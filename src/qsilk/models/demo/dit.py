"""The demo denoiser: a class-conditional diffusers ``DiTTransformer2DModel`` with adaLN-Zero blocks.

Two diffusers defaults are corrected here (see docs/demo-model.md):
- every block owns a ``LabelEmbedding`` that would drop labels independently per block in ``train()``; we set
  their ``dropout_prob`` to 0 and drop labels once per sample with :func:`drop_labels` instead, so the fully
  unconditional branch used by classifier-free guidance is really trained;
- the blocks' modulation layers and the output projections start at zero (adaLN-Zero), so each block starts as
  the identity and the model as a zero predictor.

The null ("unconditional") class id is ``num_classes``: the extra embedding row that diffusers allocates when the
model is built with label dropout enabled.
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding

DIT_PRESETS: dict[str, dict] = {
    "h256": {"num_attention_heads": 4, "attention_head_dim": 64, "num_layers": 6},
    "h192": {"num_attention_heads": 3, "attention_head_dim": 64, "num_layers": 6},
    "tiny": {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2},
}

# Noise schedule shared by training and the shipped scheduler: cosine betas (near-zero terminal SNR) and
# v-prediction; "trailing" spacing so few-step sampling starts at t = 999.
SCHEDULE_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "timestep_spacing": "trailing",
}


def build_dit(
    num_classes: int = 10,
    preset: str = "h256",
    sample_size: int = 16,
    latent_channels: int = 4,
    patch_size: int = 2,
) -> DiTTransformer2DModel:
    """A fresh DiT with label dropout disabled and adaLN-Zero initialisation."""
    model = DiTTransformer2DModel(
        in_channels=latent_channels,
        out_channels=latent_channels,
        sample_size=sample_size,
        patch_size=patch_size,
        num_embeds_ada_norm=num_classes,
        **DIT_PRESETS[preset],
    )
    disable_label_dropout(model)
    zero_init_adaln(model)
    return model


def null_class_id(model: DiTTransformer2DModel) -> int:
    return int(model.config.num_embeds_ada_norm)


def disable_label_dropout(model: torch.nn.Module) -> int:
    """Set ``dropout_prob = 0`` on every ``LabelEmbedding``; returns how many there were.

    The table keeps its null row (it was sized when the model was built with dropout > 0)."""
    count = 0
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
            count += 1
    return count


def zero_init_adaln(model: DiTTransformer2DModel) -> None:
    """adaLN-Zero: zero each block's modulation (norm1.linear) and the final modulation and projection."""
    layers = [block.norm1.linear for block in model.transformer_blocks] + [model.proj_out_1, model.proj_out_2]
    with torch.no_grad():
        for layer in layers:
            layer.weight.zero_()
            layer.bias.zero_()


def drop_labels(
    labels: torch.Tensor, p: float, null_id: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each sample's label by ``null_id`` with probability ``p`` (one draw per sample)."""
    rand_device = generator.device if generator is not None else labels.device
    drop = (torch.rand(labels.shape[0], generator=generator, device=rand_device) < p).to(labels.device)
    return torch.where(drop, torch.full_like(labels, null_id), labels)
