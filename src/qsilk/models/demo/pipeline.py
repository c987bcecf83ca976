"""``QSilkDemoPipeline``: class-conditional latent DiT sampling with classifier-free guidance via a null class.

Scheduler-agnostic (``scale_model_input`` + ``step``), and ``scheduler.step`` is called once per step on the
*guided* output of the B real samples, so wrappers of ``pipe.scheduler.step`` (``qsilk.enable``) see exactly
what the sampler integrates.

The CFG combination can be replaced by a guider: any object with the protocol of ``diffusers.guiders``
(``set_state(step, num_inference_steps, timestep)``, ``num_conditions``, ``forward(pred_cond, pred_uncond)``),
e.g. ``ClassifierFreeGuidance(guidance_scale=7, guidance_rescale=0.7)``, ``AdaptiveProjectedGuidance``,
``FrequencyDecoupledGuidance``. The guider combines the model's own predictions (v for the demo model), or the x0
predictions derived from them when ``guidance_space="x0"`` (or the guider's ``prediction_space`` says "x0").
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, DiTTransformer2DModel, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .autoencoder import denormalise_latents

GUIDANCE_SPACES = ("model", "x0")


class QSilkDemoPipeline(DiffusionPipeline):
    """Fashion-MNIST class-conditional latent DiT (see docs/demo-model.md).

    Args:
        transformer: class-conditional ``DiTTransformer2DModel`` (v-prediction).
        vae: ``AutoencoderKL`` whose config holds the latent ``scaling_factor`` / ``shift_factor``.
        scheduler: any diffusers scheduler with ``scale_model_input`` / ``step``.
        id2label: class id -> name (names may list synonyms separated by commas).
        null_class_id: the unconditional class id; defaults to ``transformer.config.num_embeds_ada_norm``.
    """

    model_cpu_offload_seq = "transformer->vae"
    # The CFG batch is [conditional, unconditional] (as in diffusers' DiTPipeline); the attention probe reads it.
    cfg_order = "cond_uncond"

    def __init__(
        self,
        transformer: DiTTransformer2DModel,
        vae: AutoencoderKL,
        scheduler,
        id2label: dict | None = None,
        null_class_id: int | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        if null_class_id is None:
            null_class_id = int(transformer.config.num_embeds_ada_norm)
        id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
        self.register_to_config(id2label=id2label, null_class_id=int(null_class_id))
        self.labels = {}
        for key, value in id2label.items():
            for name in value.split(","):
                self.labels[name.strip()] = key
        self.labels = dict(sorted(self.labels.items()))

    @property
    def null_class_id(self) -> int:
        return int(self.config.null_class_id)

    def get_label_ids(self, label: str | Sequence[str]) -> list[int]:
        """Map class names (see ``pipe.labels``) to ids."""
        names = [label] if isinstance(label, str) else list(label)
        missing = [n for n in names if n not in self.labels]
        if missing:
            raise ValueError(f"unknown class names {missing}; choose from {sorted(self.labels)}")
        return [self.labels[n] for n in names]

    def _class_tensor(self, class_labels, device: torch.device) -> torch.Tensor:
        if isinstance(class_labels, torch.Tensor):
            ids = class_labels.flatten().tolist()
        elif isinstance(class_labels, int | str):
            ids = [class_labels]
        else:
            ids = list(class_labels)
        ids = [self.get_label_ids(i)[0] if isinstance(i, str) else int(i) for i in ids]
        num_classes = int(self.transformer.config.num_embeds_ada_norm)
        bad = [i for i in ids if not 0 <= i <= num_classes]
        if bad:
            raise ValueError(f"class ids {bad} out of range 0..{num_classes} ({num_classes} = unconditional)")
        return torch.tensor(ids, device=device, dtype=torch.long)

    def _step_kwargs(self, generator) -> dict:
        # Inspect the scheduler class, not the (possibly wrapped) bound method.
        params = inspect.signature(type(self.scheduler).step).parameters
        return {"generator": generator} if "generator" in params else {}

    def _check_guider(self, guider, guidance_scale, guidance_space) -> str:
        if guidance_scale is not None:
            raise ValueError(
                "pass the guidance scale inside the guider (e.g. ClassifierFreeGuidance(guidance_scale=7)), "
                "not as guidance_scale, when a guider is given"
            )
        missing = [name for name in ("set_state", "forward", "num_conditions") if not hasattr(guider, name)]
        if missing:
            raise TypeError(f"guider {type(guider).__name__} lacks {missing} (the diffusers.guiders protocol)")
        inputs = getattr(guider, "_input_predictions", ["pred_cond", "pred_uncond"])
        if list(inputs) != ["pred_cond", "pred_uncond"]:
            raise ValueError(
                f"{type(guider).__name__} needs predictions {inputs}; this pipeline provides only "
                "pred_cond and pred_uncond"
            )
        space = guidance_space or getattr(guider, "prediction_space", "model")
        if space not in GUIDANCE_SPACES:
            raise ValueError(f"guidance_space must be one of {GUIDANCE_SPACES}, got {space!r}")
        return space

    def _guide(self, guider, space: str, cond, uncond, latents, t):
        """The guider's combination of (cond, uncond) model outputs, as a model output."""
        if space == "model":
            result = guider.forward(cond, uncond)
            return result.pred if hasattr(result, "pred") else result
        from qsilk.sampling.adapters import adapter_for, output_to_x0

        point = adapter_for(self.scheduler).locate(self.scheduler, t)
        if point.c_out == 0:
            raise ValueError(f"cannot guide in x0 space at timestep {t}: the x0 coefficient of the output is 0")
        x0_cond = output_to_x0(latents, cond, point.c_skip, point.c_out)
        x0_uncond = None if uncond is None else output_to_x0(latents, uncond, point.c_skip, point.c_out)
        result = guider.forward(x0_cond, x0_uncond)
        guided = result.pred if hasattr(result, "pred") else result
        if guided is x0_cond:  # conditional only: keep the model's output exactly (no float round trip)
            return cond
        return (guided - point.c_skip * latents) / point.c_out

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str] | torch.Tensor,
        num_inference_steps: int = 8,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        guider=None,
        guidance_space: str | None = None,
    ):
        """Sample one image per class label. ``output_type``: "pil", "np", "pt" (RGB in [0, 1]) or "latent".

        ``guidance_scale`` (default 4.0) is plain CFG, ``uncond + w (cond - uncond)`` on the model output; a
        ``guider`` (see the module doc) replaces it and carries its own scale. The unconditional branch is evaluated
        only at steps where the guider asks for two conditions (e.g. outside a guidance interval it is skipped).
        """
        space = self._check_guider(guider, guidance_scale, guidance_space) if guider is not None else None
        if guider is None and guidance_scale is None:
            guidance_scale = 4.0
        device = self._execution_device
        dtype = self.transformer.dtype
        labels = self._class_tensor(class_labels, device)
        batch = labels.shape[0]
        channels = self.transformer.config.in_channels
        size = self.transformer.config.sample_size
        if latents is None:
            latents = randn_tensor((batch, channels, size, size), generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = latents * self.scheduler.init_noise_sigma
        # Conditional half first, then the null class (the same order as diffusers' DiTPipeline).
        null_labels = torch.full_like(labels, self.null_class_id)
        step_kwargs = self._step_kwargs(generator)
        self._num_timesteps = len(timesteps)

        for i, t in enumerate(self.progress_bar(timesteps)):
            if guider is not None:
                guider.set_state(step=i, num_inference_steps=len(timesteps), timestep=t)
                if hasattr(guider, "prepare_inputs"):
                    guider.prepare_inputs({})  # per-run state (APG's momentum buffer is rebuilt at step 0)
                do_cfg = guider.num_conditions > 1
            else:
                do_cfg = guidance_scale > 1.0
            model_input = self.scheduler.scale_model_input(latents, t)
            model_labels = labels
            if do_cfg:
                model_input = torch.cat([model_input, model_input])
                model_labels = torch.cat([labels, null_labels])
            t_batch = torch.as_tensor(t, device=device).reshape(1).expand(model_input.shape[0])
            output = self.transformer(model_input, timestep=t_batch, class_labels=model_labels).sample
            output = output[:, :channels]  # drop learned-sigma channels if a model has them
            if guider is not None:
                cond, uncond = output.chunk(2) if do_cfg else (output, None)
                output = self._guide(guider, space, cond, uncond, latents, t)
            elif do_cfg:
                cond, uncond = output.chunk(2)
                output = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(output, t, latents, **step_kwargs, return_dict=False)[0]
            if callback_on_step_end is not None:
                local = {"latents": latents}
                callback_kwargs = {k: local[k] for k in callback_on_step_end_tensor_inputs}
                callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                latents = callback_outputs.pop("latents", latents)

        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(denormalise_latents(self.vae, latents).to(self.vae.dtype)).sample
            images = (decoded.float() / 2 + 0.5).clamp(0, 1)
            if images.shape[1] == 1:
                images = images.repeat(1, 3, 1, 1)
            if output_type in ("np", "pil"):
                images = images.permute(0, 2, 3, 1).cpu().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
            elif output_type != "pt":
                raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', not {output_type!r}")
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def _to_uint8_grid(images: np.ndarray, ncols: int) -> np.ndarray:
    """(N, H, W, C) floats in [0, 1] -> one uint8 grid image."""
    n, h, w, c = images.shape
    nrows = -(-n // ncols)
    grid = np.ones((nrows * h, ncols * w, c), dtype=np.float32)
    for k in range(n):
        r, col = divmod(k, ncols)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = images[k]
    return (grid * 255).round().astype(np.uint8)
