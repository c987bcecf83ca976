"""Train a QRM on a frozen class-conditional DiT pipeline (the demo model) with ReFL-style truncated rollouts.

    python -m qsilk.qrm.train --out runs/qrm/light --kind light --steps 1500

Per step: draw classes, noise, a CFG scale and a target step i* in the active window (one torch.Generator, whose
state is checkpointed); sample without gradients to i* (QRM on); at i* run the guided model once with gradients
through QRM, convert to x0, decode with the frozen VAE, score with a differentiable reward (default: log p(class)
under our own MLP, :mod:`qsilk.qrm.rewards`) and subtract ``reg_weight`` times the squared distance to the frozen
model's own x0 at the same state. AdamW, warm-up + cosine LR, gradient clipping.

Checkpoints (every ``checkpoint_every`` steps, atomic): ``checkpoint.safetensors`` (QRM weights, AdamW state, RNG
state) + ``checkpoint.json`` (step, configs). Re-running the same command resumes from it; with one thread on CPU a
resumed run reaches bit-for-bit the QRM of an uninterrupted one. At the end ``qrm.safetensors`` / ``qrm.json`` hold
the trained QRM (fp32; ``--export`` also writes an fp16 copy) and ``metrics.jsonl`` one record per step.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from qsilk.files import atomic_save_tensors, atomic_write_bytes

from .config import QRMConfig
from .hooks import QRMHandle, attach, detach
from .io import save_qrm
from .module import QRM
from .rewards import ClassifierReward, x0_penalty


@dataclass
class TrainConfig:
    """Defaults: the recipe of the shipped demo QRM (docs/qrm.md), so ``qsilk train-qrm --out DIR`` reproduces it."""

    kind: str = "light"
    steps: int = 240
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 20
    grad_clip: float = 1.0
    num_inference_steps: int = 8
    cfg_min: float = 2.0
    cfg_max: float = 6.0
    window: tuple[float, float] = (0.0, 1.0)
    reg_weight: float = 40.0  # chosen on validation seeds: 10 bought judge gains with in-domain FD (docs/qrm.md)
    apply_to_uncond: bool = False
    seed: int = 0
    checkpoint_every: int = 20

    def __post_init__(self) -> None:
        self.window = tuple(float(w) for w in self.window)
        problems = []
        for name in ("steps", "batch_size", "num_inference_steps", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1")
        if not 0 <= self.cfg_min <= self.cfg_max:
            problems.append("need 0 <= cfg_min <= cfg_max")
        if self.lr <= 0 or self.reg_weight < 0 or self.warmup < 0:
            problems.append("lr must be > 0, reg_weight and warmup >= 0")
        if len(self.window) != 2 or not 0.0 <= self.window[0] <= self.window[1] <= 1.0:
            problems.append(f"window must satisfy 0 <= start <= end <= 1, got {self.window}")
        if self.kind not in ("light", "faithful"):
            problems.append(f"kind must be light or faithful, got {self.kind!r}")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["window"] = list(self.window)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def window_steps(window: tuple[float, float], num_steps: int) -> list[int]:
    steps = [i for i in range(num_steps) if window[0] <= i / max(num_steps - 1, 1) <= window[1]]
    if not steps:
        raise ValueError(f"window {window} contains none of the {num_steps} sampler steps")
    return steps


def lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(config.steps - config.warmup, 1)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def null_class_id(pipe) -> int:
    if hasattr(pipe, "null_class_id"):
        return int(pipe.null_class_id)
    return int(pipe.transformer.config.num_embeds_ada_norm)


def x0_from_output(scheduler, output: Tensor, sample: Tensor, t: Tensor) -> Tensor:
    """x0 from the model output for alphas_cumprod schedulers (epsilon / v_prediction / sample)."""
    alpha = scheduler.alphas_cumprod.to(sample.device)[int(t)].to(sample.dtype)
    a, s = alpha.sqrt(), (1 - alpha).sqrt()
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return a * sample - s * output
    if kind == "epsilon":
        return (sample - s * output) / a
    if kind == "sample":
        return output
    raise ValueError(f"unsupported prediction_type {kind!r}")


class Rollout:
    """Sampling with the pipeline's frozen transformer and a private copy of its scheduler, CFG batch
    [cond, uncond] (the demo pipeline's layout)."""

    def __init__(self, pipe, handle: QRMHandle):
        self.pipe = pipe
        self.handle = handle
        self.scheduler = copy.deepcopy(pipe.scheduler)
        self.channels = pipe.transformer.config.in_channels
        self.null = null_class_id(pipe)

    def guided(self, x: Tensor, t: Tensor, labels: Tensor, cfg: Tensor) -> Tensor:
        inp = self.scheduler.scale_model_input(x, t)
        inp = torch.cat([inp, inp])
        model_labels = torch.cat([labels, torch.full_like(labels, self.null)])
        t_batch = torch.as_tensor(t, device=x.device).reshape(1).expand(inp.shape[0])
        out = self.pipe.transformer(inp, timestep=t_batch, class_labels=model_labels).sample[
            :, : self.channels
        ]
        cond, uncond = out.chunk(2)
        return uncond + cfg.view(-1, 1, 1, 1) * (cond - uncond)

    def to_step(
        self, noise: Tensor, labels: Tensor, cfg: Tensor, num_steps: int, target: int
    ) -> tuple[Tensor, Tensor]:
        """Run ``target`` sampler steps without gradients; returns (x_t at step ``target``, its timestep)."""
        self.scheduler.set_timesteps(num_steps, device=noise.device)
        timesteps = self.scheduler.timesteps
        x = noise * self.scheduler.init_noise_sigma
        with torch.no_grad():
            for i in range(target):
                self.handle.progress = i / max(num_steps - 1, 1)
                out = self.guided(x, timesteps[i], labels, cfg)
                x = self.scheduler.step(out, timesteps[i], x, return_dict=False)[0]
        self.handle.progress = target / max(num_steps - 1, 1)
        return x, timesteps[target]

    def decode(self, x0: Tensor) -> Tensor:
        from qsilk.models.demo.autoencoder import denormalise_latents

        vae = self.pipe.vae
        return vae.decode(denormalise_latents(vae, x0).to(vae.dtype)).sample


def _rng_tensor(g: torch.Generator) -> Tensor:
    return g.get_state().clone()


def save_checkpoint(
    out: Path,
    step: int,
    qrm: QRM,
    opt: torch.optim.Optimizer,
    g: torch.Generator,
    config: TrainConfig,
    elapsed: float,
) -> None:
    tensors = {f"qrm.{k}": v for k, v in qrm.state_dict().items()}
    opt_state = opt.state_dict()
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"opt.{idx}.{key}"] = torch.as_tensor(value)
    tensors["rng.generator"] = _rng_tensor(g)
    atomic_save_tensors(tensors, out / "checkpoint.safetensors")
    record = {
        "step": step,
        "elapsed_seconds": elapsed,
        "train_config": config.to_dict(),
        "qrm_config": qrm.config.to_dict(),
        "param_groups": opt_state["param_groups"],
    }
    atomic_write_bytes(out / "checkpoint.json", json.dumps(record, indent=2).encode())


def load_checkpoint(
    out: Path, qrm: QRM, opt: torch.optim.Optimizer, g: torch.Generator, config: TrainConfig
) -> tuple[int, float]:
    record = json.loads((out / "checkpoint.json").read_text())
    if record["train_config"] != config.to_dict():
        diff = {k for k in record["train_config"] if record["train_config"][k] != config.to_dict().get(k)}
        diff -= {"steps", "checkpoint_every"}  # extending a run is allowed
        if diff:
            raise ValueError(
                f"{out} holds a run with a different training config ({sorted(diff)}); use another --out"
            )
    if record["qrm_config"] != qrm.config.to_dict():
        raise ValueError(f"{out} holds a QRM with a different config; use another --out")
    tensors = load_file(str(out / "checkpoint.safetensors"))
    qrm.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("qrm.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": record["param_groups"]})
    g.set_state(tensors["rng.generator"])
    return int(record["step"]), float(record.get("elapsed_seconds", 0.0))


def _trim_log(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [
        line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] < step
    ]
    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())


def train_qrm(
    pipe,
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    reward: Callable[[Tensor, Tensor], Tensor] | None = None,
    qrm_config: QRMConfig | None = None,
    progress_bar: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
) -> QRM:
    """Train (or resume) a QRM for ``pipe`` (a class-conditional DiT pipeline with a VAE); returns the QRM."""
    config = config or TrainConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    transformer = pipe.transformer.eval().requires_grad_(False)
    pipe.vae.eval().requires_grad_(False)
    device = next(transformer.parameters()).device
    reward = reward if reward is not None else ClassifierReward().to(device)
    if qrm_config is None:
        qrm_config = QRMConfig.for_transformer(
            transformer, config.kind, window=config.window, apply_to_uncond=config.apply_to_uncond
        )
    torch.manual_seed(config.seed)  # QRM initialisation
    qrm = QRM(qrm_config).to(device).train()
    opt = torch.optim.AdamW(qrm.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    g = torch.Generator(device="cpu").manual_seed(config.seed)
    start, elapsed = 0, 0.0
    log_path = out / "metrics.jsonl"
    if (out / "checkpoint.json").exists():
        start, elapsed = load_checkpoint(out, qrm, opt, g, config)
    _trim_log(log_path, start)
    allowed = window_steps(config.window, config.num_inference_steps)
    num_classes = int(transformer.config.num_embeds_ada_norm)
    shape = (
        config.batch_size,
        transformer.config.in_channels,
        transformer.config.sample_size,
        transformer.config.sample_size,
    )
    detach(pipe)
    handle = attach(pipe, qrm, window=(0.0, 1.0))  # the trainer sets handle.progress itself
    rollout = Rollout(pipe, handle)
    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc=f"train-qrm {config.kind}", dynamic_ncols=True)
    t0 = time.time() - elapsed
    try:
        with open(log_path, "a") as log:
            for step in range(start, config.steps):
                labels = torch.randint(0, num_classes, (config.batch_size,), generator=g).to(device)
                noise = torch.randn(shape, generator=g).to(device)
                cfg = (
                    config.cfg_min
                    + (config.cfg_max - config.cfg_min) * torch.rand(config.batch_size, generator=g)
                ).to(device)
                target = allowed[int(torch.randint(0, len(allowed), (1,), generator=g))]
                x, t = rollout.to_step(noise, labels, cfg, config.num_inference_steps, target)
                out_qrm = rollout.guided(x, t, labels, cfg)
                x0 = x0_from_output(rollout.scheduler, out_qrm, x, t)
                with torch.no_grad():
                    handle.enabled = False
                    x0_base = x0_from_output(rollout.scheduler, rollout.guided(x, t, labels, cfg), x, t)
                    handle.enabled = True
                    reward_base = reward(rollout.decode(x0_base), labels)
                score = reward(rollout.decode(x0), labels)
                penalty = x0_penalty(x0, x0_base)
                loss = (-score + config.reg_weight * penalty).mean()
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, config)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(qrm.parameters(), config.grad_clip)
                opt.step()
                record = {
                    "step": step,
                    "loss": float(loss.detach()),
                    "reward": float(score.detach().mean()),
                    "reward_gain": float((score.detach() - reward_base).mean()),
                    "penalty": float(penalty.detach().mean()),
                    "grad_norm": float(grad_norm),
                    "target_step": target,
                    "lr": lr_at(step, config),
                    "seconds": round(time.time() - t0, 2),
                }
                log.write(json.dumps(record) + "\n")
                log.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(gain=f"{record['reward_gain']:+.3f}", pen=f"{record['penalty']:.4f}")
                done = step + 1
                if done % config.checkpoint_every == 0 or done == config.steps:
                    save_checkpoint(out, done, qrm, opt, g, config, time.time() - t0)
                if on_step is not None:
                    on_step(done, record)
    finally:
        handle.remove()
        if bar is not None:
            bar.close()
    qrm.eval()
    total = time.time() - t0
    save_qrm(
        qrm,
        out / "qrm",
        metadata={"train_config": config.to_dict(), "train_seconds": round(total, 1), "steps": config.steps},
    )
    return qrm


def main(argv: list[str] | None = None, prog: str = "python -m qsilk.qrm.train") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", required=True, help="run folder (checkpoints, metrics.jsonl, qrm.safetensors)"
    )
    parser.add_argument("--model", default=None, help="demo model folder (default: the shipped demo model)")
    parser.add_argument("--reward", default=None, help="reward MLP folder (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--export", default=None, help="also write an fp16 copy of the final QRM to this path"
    )
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif isinstance(value, tuple):
            parser.add_argument(flag, type=float, nargs=2, default=value, metavar=("START", "END"))
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = parser.parse_args(argv)
    try:
        config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
        torch.set_num_threads(args.threads)
        from qsilk.models.demo import load_demo_pipeline

        from .rewards import load_mlp

        pipe = load_demo_pipeline(path=args.model)
        reward = ClassifierReward(load_mlp(args.reward) if args.reward else None)
        qrm = train_qrm(pipe, args.out, config, reward=reward)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.export:
        save_qrm(
            qrm,
            args.export,
            metadata=getattr(qrm, "metadata", {}) or {"train_config": config.to_dict()},
            dtype=torch.float16,
        )
    print(f"trained QRM: {Path(args.out) / 'qrm.safetensors'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
