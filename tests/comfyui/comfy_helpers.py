"""A file-free tiny SD1.5 model in real ComfyUI (supported_models.SD15 + ModelPatcher), conditioning and a sampler
call, as in shared/comfyui/README.md."""

from __future__ import annotations

import math

import torch

CONTEXT_DIM = 64
UNET_CONFIG = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    # three levels, attention on the lower two only (as SDXL): a 64x96 latent stays cheap on one CPU thread
    num_res_blocks=[1, 1, 1],
    channel_mult=[1, 2, 2],
    transformer_depth=[0, 1, 1],
    transformer_depth_output=[0, 0, 1, 1, 1, 1],
    transformer_depth_middle=1,
    num_heads=2,
    num_head_channels=-1,
    context_dim=CONTEXT_DIM,
    use_linear_in_transformer=False,
    use_spatial_transformer=True,
    legacy=False,
    adm_in_channels=None,
    use_temporal_attention=False,
)


def tiny_sd15():
    """A ~1 M-parameter SD1.5-family ModelPatcher with deterministic random weights (ComfyUI leaves them empty)."""
    import comfy.model_patcher
    import comfy.supported_models

    model = comfy.supported_models.SD15(dict(UNET_CONFIG)).get_model({})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return comfy.model_patcher.ModelPatcher(
        model, load_device=torch.device("cpu"), offload_device=torch.device("cpu")
    )


def conditioning(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    positive = [[torch.randn(1, 77, CONTEXT_DIM, generator=generator), {}]]
    negative = [[torch.randn(1, 77, CONTEXT_DIM, generator=generator) * 0.1, {}]]
    return positive, negative


def ksample(model, *, steps=4, cfg=7.0, sampler="euler", scheduler="normal", hw=(8, 12), batch=1, seed=0):
    """Latents from ComfyUI's own KSampler node (nodes.KSampler) on an empty latent."""
    import nodes

    positive, negative = conditioning()
    latent = {"samples": torch.zeros(batch, 4, *hw)}
    (out,) = nodes.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent)
    return out["samples"]


def add_spy(model, calls: list):
    """Clone with a post-CFG function that records (denoised in, sigma, sample_sigmas) and changes nothing."""

    def spy(args):
        calls.append(
            {
                "denoised": args["denoised"].clone(),
                "sigma": args["sigma"].clone(),
                "sigmas": args["model_options"]["transformer_options"].get("sample_sigmas"),
                "uncond_denoised": args["uncond_denoised"],
            }
        )
        return args["denoised"]

    patched = model.clone()
    patched.set_model_sampler_post_cfg_function(spy)
    return patched


FLUX_CONFIG = dict(
    image_model="flux",
    in_channels=16,
    out_channels=16,
    vec_in_dim=32,
    context_in_dim=32,
    hidden_size=64,
    mlp_ratio=2.0,
    num_heads=2,
    depth=1,
    depth_single_blocks=1,
    axes_dim=[8, 12, 12],
    theta=10000,
    patch_size=2,
    qkv_bias=True,
    guidance_embed=True,
)


def tiny_flux():
    """A tiny Flux (one double and one single block) ModelPatcher: ComfyUI's own Flux code, random weights."""
    import comfy.model_patcher
    import comfy.supported_models

    model = comfy.supported_models.Flux(dict(FLUX_CONFIG)).get_model({})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
            elif name.endswith(("weight", "scale")):
                p.fill_(1.0)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return comfy.model_patcher.ModelPatcher(
        model, load_device=torch.device("cpu"), offload_device=torch.device("cpu")
    )


def flux_sample(model, *, hw=(7, 10), steps=3, text_tokens=7):
    """Flux dev style: CFG 1 with a guidance embedding, euler / simple."""
    import nodes

    generator = torch.Generator().manual_seed(2)
    positive = [
        [
            torch.randn(1, text_tokens, 32, generator=generator),
            {"pooled_output": torch.randn(1, 32, generator=generator), "guidance": 3.5},
        ]
    ]
    negative = [[torch.zeros(1, text_tokens, 32), {"pooled_output": torch.zeros(1, 32), "guidance": 3.5}]]
    latent = {"samples": torch.zeros(1, 16, *hw)}
    (out,) = nodes.KSampler().sample(model, 0, steps, 1.0, "euler", "simple", positive, negative, latent)
    return out["samples"]
