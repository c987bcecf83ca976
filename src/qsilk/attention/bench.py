"""Cost of the attention-entropy probe as a fraction of one denoiser step.

Reference setting: the SD 1.5 UNet (real architecture config, random weights) at 512x512 (64x64 latent), batch 2
([uncond, cond] CFG batch), the probe's defaults (layers, sampling budget, cfg_batched="auto", which keeps the sampled
queries/keys of both halves during the forward and measures the conditional half in confidence()).
Run: ``python -m qsilk.attention.bench``.

Two figures, both per denoiser step:
- ``probe_fraction``: host time spent inside the probe (entropy of the sampled rows in the SDPA tap, plus the
  confidence() mapping) / the plain step time. Robust on a busy machine; on CUDA it counts launch time only.
- ``end_to_end_fraction``: (step with probe - step without) / step without, interleaved runs, median. It also
  includes the TorchFunctionMode dispatch on the other ops of the probed layers, but is noisy when timings
  fluctuate by more than the overhead itself. On CUDA this is the figure to read (use repeats >= 10).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from typing import Literal

import torch

from qsilk.attention.probe import AttentionEntropyProbe


def sd15_unet_config() -> dict:
    """The Stable Diffusion 1.5 UNet architecture (diffusers UNet2DConditionModel arguments)."""
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


@torch.no_grad()
def bench_probe(
    *,
    height: int = 512,
    width: int = 512,
    batch_size: int = 2,
    cfg_batched: bool | Literal["auto"] = "auto",
    layers: Sequence[str] | None = None,
    max_queries: int = 256,
    max_heads: int = 4,
    repeats: int = 1,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    unet_config: dict | None = None,
) -> dict:
    """Time one UNet step with and without the probe; returns a JSON-serialisable dict of figures.

    ``unet_config`` replaces the SD 1.5 architecture (tests use a tiny one).
    """
    from diffusers import UNet2DConditionModel

    device = torch.device(device)
    config = sd15_unet_config() if unet_config is None else dict(unet_config)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config).to(device).eval()
    if dtype != torch.float32:  # diffusers warns about .to(dtype) even when it is a no-op
        unet = unet.to(dtype)
    latent_hw = (height // 8, width // 8)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sample = torch.randn(batch_size, 4, *latent_hw, generator=gen).to(device, dtype)
    text = torch.randn(batch_size, 77, config["cross_attention_dim"], generator=gen).to(device, dtype)
    timestep = torch.full((batch_size,), 500, device=device)
    probe = AttentionEntropyProbe(
        unet, layers, max_queries=max_queries, max_heads=max_heads, cfg_batched=cfg_batched
    )
    conditional = (
        batch_size // 2 if cfg_batched else batch_size
    )  # "auto" is truthy: the batch is [uncond, cond]

    def plain_step():
        unet(sample, timestep, encoder_hidden_states=text)

    def probed_step():
        unet(sample, timestep, encoder_hidden_states=text)
        if probe.confidence(latent_hw, conditional) is None:
            raise RuntimeError("the probe captured nothing; the benchmark would measure a no-op")

    for _ in range(warmup):
        plain_step()
        with probe:
            probed_step()
    plain, probed, inline = [], [], []
    for _ in range(repeats):  # interleaved, so drifting machine load hits both alike
        plain.append(_timed(plain_step, device))
        with probe:
            before = probe.overhead_seconds
            probed.append(_timed(probed_step, device))
            inline.append(probe.overhead_seconds - before)
    step, step_probed, probe_s = (statistics.median(x) for x in (plain, probed, inline))
    import diffusers

    return {
        "model": "SD1.5 UNet2DConditionModel (random weights)" if unet_config is None else "custom UNet",
        "height": height,
        "width": width,
        "batch_size": batch_size,
        "cfg_batched": cfg_batched,
        "layers": probe.layer_names,
        "max_queries": max_queries,
        "max_heads": max_heads,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "step_seconds": step,
        "step_seconds_with_probe": step_probed,
        "probe_seconds": probe_s,
        "probe_fraction": probe_s / step,
        "end_to_end_fraction": (step_probed - step) / step,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    figures = bench_probe(
        height=args.size,
        width=args.size,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        repeats=args.repeats,
        warmup=args.warmup,
    )
    print(json.dumps(figures, indent=2))
