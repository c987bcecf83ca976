"""Tiny random-weight diffusers pipelines built offline from configs (no hub access), for tests and the CLI's tests.

Stable entry points (other test files import them):
    tiny_sd_pipeline(prediction_type="epsilon", scheduler="ddim")   SD 1.x layout, 32 px -> 16x16 latent
    tiny_dit_pipeline(scheduler="ddim")                             class-conditional DiTPipeline, 16x16 latent
    tiny_sdxl_pipeline / tiny_sd3_pipeline / tiny_flux_pipeline / tiny_pixart_pipeline
    tiny_demo_pipeline(scheduler_cls=None)                          the demo model's pipeline, 'tiny' preset
    tiny_unet / tiny_vae / tiny_*_transformer(seed=0, **overrides)  the denoisers alone, config entries overridden
    make_scheduler(name, prediction_type="epsilon", flow=False)     see SCHEDULERS
    call_kwargs(pipe, steps=3, seed=0, **overrides)                 tiny, deterministic pipeline call arguments

Tokenizers are built in memory from a character vocabulary (transformers 5 accepts vocab/merges objects), so
``pipe.save_pretrained(dir)`` / ``from_pretrained(dir)`` round-trip without any download.
"""

from __future__ import annotations

import string

import torch

TOKENS = 16  # tokenizer model_max_length: pipelines pad prompts to this
CLIP_HIDDEN = 32


def _seeded(cls, defaults: dict, seed: int, overrides: dict):
    """``cls(**defaults, **overrides)`` in eval mode, its random weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return cls(**{**defaults, **overrides}).eval()


# -- tokenizers and text encoders ----------------------------------------------------------------------------------


def clip_tokenizer():
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    pieces = specials + chars + [c + "</w>" for c in chars]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TOKENS)


def t5_tokenizer():
    from transformers import T5Tokenizer

    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in chars] + [("\u2581" + c, -1.5) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=TOKENS)


def clip_text_encoder(with_projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=CLIP_HIDDEN,
        intermediate_size=37,
        projection_dim=CLIP_HIDDEN,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=128,
        max_position_embeddings=TOKENS,
        hidden_act="gelu",
    )
    model = CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)
    return model.eval()


def t5_encoder(d_model: int = 32, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=128,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def tiny_vae(latent_channels: int = 4, blocks: tuple[int, ...] = (8, 16), seed: int = 0, **overrides):
    """AutoencoderKL with len(blocks) - 1 downsamplings (default 2x: 32 px RGB <-> 16x16 latent)."""
    from diffusers import AutoencoderKL

    config = dict(
        block_out_channels=blocks,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
    )
    return _seeded(AutoencoderKL, config, seed, overrides)


# -- schedulers -------------------------------------------------------------------------------------------------------

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)

# name -> (class name, extra config); VP ones take SD's betas and a prediction_type.
SCHEDULERS = {
    "ddim": ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1)),
    "ddpm": ("DDPMScheduler", dict(clip_sample=False)),
    "pndm": ("PNDMScheduler", dict(skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)),
    "euler": ("EulerDiscreteScheduler", dict(timestep_spacing="trailing")),
    "euler_a": ("EulerAncestralDiscreteScheduler", dict()),
    "lms": ("LMSDiscreteScheduler", dict()),
    "heun": ("HeunDiscreteScheduler", dict()),
    "kdpm2": ("KDPM2DiscreteScheduler", dict()),
    "dpmpp": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
    "dpmpp_single": ("DPMSolverSinglestepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
    "unipc": ("UniPCMultistepScheduler", dict(solver_order=2)),
    "deis": ("DEISMultistepScheduler", dict(solver_order=2)),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
}
# Multistep schedulers in their flow configuration (as used with SD3 / Flux / Sana / Wan).
FLOW_CAPABLE = ("dpmpp", "unipc", "deis", "dpmpp_single")


def make_scheduler(name: str, prediction_type: str = "epsilon", flow: bool = False):
    """A scheduler by short name (see SCHEDULERS). ``flow=True``: a multistep one on flow sigmas, predicting flow."""
    import diffusers

    class_name, extra = SCHEDULERS[name]
    cls = getattr(diffusers, class_name)
    if class_name.startswith("FlowMatch"):
        return cls(num_train_timesteps=1000, **extra)
    if flow:
        if name not in FLOW_CAPABLE:
            raise ValueError(f"{name} has no flow configuration")
        return cls(
            num_train_timesteps=1000,
            use_flow_sigmas=True,
            prediction_type="flow_prediction",
            flow_shift=3.0,
            **extra,
        )
    scheduler = cls(**SD_BETAS, prediction_type=prediction_type, **extra)
    if scheduler.config.get("steps_offset", 1) != 1:  # SD pipelines would set it (with a deprecation warning)
        scheduler.register_to_config(steps_offset=1)
    return scheduler


# -- pipelines -------------------------------------------------------------------------------------------------------------


UNET = dict(
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4,
    norm_num_groups=8,
    sample_size=16,
    in_channels=4,
    out_channels=4,
)
SDXL_UNET = dict(
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=CLIP_HIDDEN + 6 * 8,  # pooled text + 6 time ids x 8
    use_linear_projection=True,
)
# The transformers of the pipelines below; tests of other layouts override single entries.
SD3 = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=2 * CLIP_HIDDEN,
    caption_projection_dim=16,
    pooled_projection_dim=2 * CLIP_HIDDEN,
)
FLUX = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=CLIP_HIDDEN,
    axes_dims_rope=(2, 2, 4),
)
# DiT and PixArt: the same patch transformer (learned sigma: 8 output channels), different conditioning.
PATCH_TRANSFORMER = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    sample_size=16,
    patch_size=2,
)
DIT = dict(PATCH_TRANSFORMER, num_embeds_ada_norm=1000, norm_num_groups=2)
PIXART = dict(PATCH_TRANSFORMER, cross_attention_dim=16, caption_channels=32)


def tiny_unet(cross_attention_dim: int = CLIP_HIDDEN, sdxl: bool = False, seed: int = 0, **overrides):
    from diffusers import UNet2DConditionModel

    config = dict(UNET, cross_attention_dim=cross_attention_dim, **(SDXL_UNET if sdxl else {}))
    return _seeded(UNet2DConditionModel, config, seed, overrides)


def tiny_sd3_transformer(seed: int = 0, **overrides):
    from diffusers import SD3Transformer2DModel

    return _seeded(SD3Transformer2DModel, SD3, seed, overrides)


def tiny_flux_transformer(seed: int = 0, **overrides):
    from diffusers import FluxTransformer2DModel

    return _seeded(FluxTransformer2DModel, FLUX, seed, overrides)


def tiny_dit_transformer(seed: int = 0, **overrides):
    from diffusers import DiTTransformer2DModel

    return _seeded(DiTTransformer2DModel, DIT, seed, overrides)


def tiny_pixart_transformer(seed: int = 0, **overrides):
    from diffusers import PixArtTransformer2DModel

    return _seeded(PixArtTransformer2DModel, PIXART, seed, overrides)


def _no_progress(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd_pipeline(prediction_type: str = "epsilon", scheduler: str = "ddim"):
    """SD 1.x layout (UNet + CLIP + VAE), no safety checker. 32x32 px images, 16x16x4 latents."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=clip_text_encoder(),
        tokenizer=clip_tokenizer(),
        unet=tiny_unet(),
        scheduler=make_scheduler(scheduler, prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _no_progress(pipe)


def tiny_sdxl_pipeline(scheduler: str = "euler", prediction_type: str = "epsilon"):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=clip_text_encoder(seed=0),
        text_encoder_2=clip_text_encoder(with_projection=True, seed=1),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=tiny_unet(cross_attention_dim=2 * CLIP_HIDDEN, sdxl=True),
        scheduler=make_scheduler(scheduler, prediction_type),
    )
    return _no_progress(pipe)


def tiny_sd3_pipeline(scheduler: str = "flow_euler"):
    """SD3 (MMDiT + two CLIPs, no T5: the pipeline feeds zeros for it). Flow matching."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(),
        scheduler=make_scheduler(scheduler, flow=scheduler != "flow_euler"),
        vae=tiny_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=clip_text_encoder(with_projection=True, seed=0),
        tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text_encoder(with_projection=True, seed=1),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    return _no_progress(pipe)


def tiny_flux_pipeline(scheduler: str = "flow_euler"):
    """Flux (double + single stream blocks, CLIP + T5), packed 2x2 latent tokens. 32 px -> 16x16x4 latent."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(
        transformer=tiny_flux_transformer(),
        scheduler=make_scheduler(scheduler, flow=scheduler != "flow_euler"),
        vae=tiny_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=clip_text_encoder(with_projection=False, seed=0),
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5_encoder(d_model=32, seed=1),
        tokenizer_2=t5_tokenizer(),
    )
    return _no_progress(pipe)


def tiny_dit_pipeline(scheduler: str = "ddim"):
    """Class-conditional DiTPipeline (learned sigma: 8 output channels), 16x16x4 latents, 10 classes."""
    from diffusers import DiTPipeline

    pipe = DiTPipeline(
        transformer=tiny_dit_transformer(),
        vae=tiny_vae(),
        scheduler=make_scheduler(scheduler),
        id2label={i: f"class{i}" for i in range(10)},
    )
    return _no_progress(pipe)


def tiny_pixart_pipeline(scheduler: str = "dpmpp"):
    """PixArt-alpha (T5 + DiT with learned sigma), 16x16x4 latents."""
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline(
        transformer=tiny_pixart_transformer(),
        scheduler=make_scheduler(scheduler),
        vae=tiny_vae(),
        text_encoder=t5_encoder(d_model=32),
        tokenizer=t5_tokenizer(),
    )
    return _no_progress(pipe)


def tiny_demo_pipeline(scheduler_cls=None):
    """The demo model's pipeline (QSilkDemoPipeline) at its 'tiny' preset, DPM-Solver++ unless ``scheduler_cls``.
    adaLN-Zero starts the DiT as a zero predictor, so its random weights are perturbed: images then depend on
    class, seed and guidance, and attention has structure, like a trained model's."""
    from diffusers import DPMSolverMultistepScheduler

    from qsilk.models.demo import CLASS_NAMES, QSilkDemoPipeline
    from qsilk.models.demo.autoencoder import build_autoencoder
    from qsilk.models.demo.dit import SCHEDULE_CONFIG, build_dit

    torch.manual_seed(0)
    transformer, vae = build_dit(preset="tiny"), build_autoencoder("tiny")
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    scheduler = (scheduler_cls or DPMSolverMultistepScheduler)(**SCHEDULE_CONFIG)
    pipe = QSilkDemoPipeline(transformer, vae, scheduler, id2label=dict(enumerate(CLASS_NAMES)))
    return _no_progress(pipe)


PIPELINES = {
    "sd": tiny_sd_pipeline,
    "sdxl": tiny_sdxl_pipeline,
    "sd3": tiny_sd3_pipeline,
    "flux": tiny_flux_pipeline,
    "dit": tiny_dit_pipeline,
    "pixart": tiny_pixart_pipeline,
}


def call_kwargs(pipe, steps: int = 3, seed: int = 0, **overrides) -> dict:
    """Deterministic tiny call arguments for any pipeline above (32 px, ``steps`` steps, CFG on)."""
    name = type(pipe).__name__
    kwargs: dict = dict(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed))
    if name == "DiTPipeline":
        kwargs.update(class_labels=[1, 3], guidance_scale=4.0)
    else:
        kwargs.update(prompt="a tiny cat", height=32, width=32, guidance_scale=5.0)
    if name == "PixArtAlphaPipeline":
        kwargs.update(use_resolution_binning=False, clean_caption=False, max_sequence_length=TOKENS)
    if name == "FluxPipeline":
        kwargs.update(max_sequence_length=TOKENS, guidance_scale=3.5)
    kwargs.update(overrides)
    return kwargs


def run(pipe, steps: int = 3, seed: int = 0, output_type: str = "latent", **overrides) -> torch.Tensor:
    """Run a tiny pipeline and return its output as one tensor (latents or np images as a tensor).

    Seeds the global RNG too: DiTPipeline passes no generator to stochastic schedulers (DDPM).
    """
    torch.manual_seed(seed)
    out = pipe(**call_kwargs(pipe, steps, seed, output_type=output_type, **overrides))
    images = out.images
    return images if isinstance(images, torch.Tensor) else torch.as_tensor(images)
