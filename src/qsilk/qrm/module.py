"""The QRM network: one token per adaLN head, a small transformer, one additive delta per head.

Inputs per sample: the timestep (normalised to [0, 1]), the pooled condition, the baseline modulation vector of
every head and optionally x_t pooled to ``xt_pool`` x ``xt_pool`` tokens. Outputs: one delta per head, of the
head's full width, added to the head's output before diffusers chunks it. The last projection starts at exactly
zero, so an untrained QRM leaves the backbone bit-identical.

- faithful: per-head LayerNorm + Linear(n*d -> width) in, pre-LN decoder blocks (self-attention over head
  tokens, cross-attention to the condition / time / x_t tokens, FFN), per-head Linear(width -> n*d) out.
- light: each chunk is projected by a basis shared by all chunks of its role (shift / scale / gate) and width
  (d -> rank), a Linear shared by heads of the same layout makes the token; encoder blocks run over the head
  tokens and the context tokens together; out, a per-head Linear(width -> n*rank) and the shared per-role basis
  back (rank -> d), plus a learned per-head constant.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import QRMConfig
from .heads import HeadSpec


def timestep_features(t: Tensor, num_freqs: int) -> Tensor:
    """Sinusoidal features of t in [0, 1] (scaled to 0..1000 as diffusion models do), (B,) -> (B, 2 * num_freqs)."""
    half = torch.arange(num_freqs, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(10000.0) * half / num_freqs)
    angles = t.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class Attention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, n, w = x.shape
        q = self.q(x).view(b, n, self.num_heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, w))


class Block(nn.Module):
    """Pre-LN transformer block: self-attention, optional cross-attention to context tokens, GELU FFN.
    (Our own, not nn.TransformerEncoderLayer: its eval-mode fast path computes differently from training.)"""

    def __init__(self, width: int, num_heads: int, ffn_mult: int, cross: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, num_heads)
        self.cross = Attention(width, num_heads) if cross else None
        self.norm_cross = nn.LayerNorm(width) if cross else None
        self.norm2 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(
            nn.Linear(width, ffn_mult * width), nn.GELU(), nn.Linear(ffn_mult * width, width)
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h)
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), context)
        return x + self.ffn(self.norm2(x))


def _layout_key(head: HeadSpec) -> str:
    return f"{'-'.join(head.roles)}_{head.dim}"


def _basis_key(role: str, dim: int) -> str:
    return f"{role}_{dim}"


class QRM(nn.Module):
    def __init__(self, config: QRMConfig):
        super().__init__()
        if not config.heads:
            raise ValueError("QRMConfig has no heads; build it with QRMConfig.for_transformer(transformer)")
        self.config = config
        width = config.width
        self.time_embed = nn.Sequential(
            nn.Linear(2 * config.time_freqs, width), nn.SiLU(), nn.Linear(width, width)
        )
        self.cond_embed = (
            nn.Sequential(nn.LayerNorm(config.cond_dim), nn.Linear(config.cond_dim, width))
            if config.cond_dim
            else None
        )
        if config.xt_channels and config.xt_pool:
            self.xt_embed = nn.Linear(config.xt_channels, width)
            self.xt_pos = nn.Parameter(torch.zeros(config.xt_pool**2, width))
        else:
            self.xt_embed = None
        self.head_pos = nn.Parameter(torch.randn(len(config.heads), width) * 0.02)
        light = config.kind == "light"
        if light:
            keys = sorted({_basis_key(r, h.dim) for h in config.heads for r in h.roles})
            self.basis_in = nn.ModuleDict(
                {k: nn.Linear(int(k.rsplit("_", 1)[1]), config.rank, bias=False) for k in keys}
            )
            self.basis_out = nn.ModuleDict(
                {k: nn.Linear(config.rank, int(k.rsplit("_", 1)[1]), bias=False) for k in keys}
            )
            layouts = {_layout_key(h): h for h in config.heads}
            self.token_in = nn.ModuleDict(
                {k: nn.Linear(len(h.roles) * config.rank, width) for k, h in layouts.items()}
            )
            self.coef_out = nn.ModuleList(
                [nn.Linear(width, len(h.roles) * config.rank) for h in config.heads]
            )
            self.head_bias = nn.ParameterList([nn.Parameter(torch.zeros(h.width)) for h in config.heads])
        else:
            self.proj_in = nn.ModuleList([nn.Linear(h.width, width) for h in config.heads])
            self.proj_out = nn.ModuleList([nn.Linear(width, h.width) for h in config.heads])
        self.blocks = nn.ModuleList(
            [Block(width, config.num_heads, config.ffn_mult, cross=not light) for _ in range(config.depth)]
        )
        self.norm_out = nn.LayerNorm(width)
        self.reset_output()

    @torch.no_grad()
    def reset_output(self) -> None:
        """Zero the last projection: every delta becomes exactly 0."""
        if self.config.kind == "light":
            for lin in self.basis_out.values():
                lin.weight.zero_()
            for bias in self.head_bias:
                bias.zero_()
        else:
            for lin in self.proj_out:
                lin.weight.zero_()
                lin.bias.zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _groups(self) -> list[tuple[str, HeadSpec, list[int]]]:
        """Heads grouped by layout (roles, dim), so the light paths run one batched op per group."""
        if getattr(self, "_group_cache", None) is not None:
            return self._group_cache
        groups: dict[str, tuple[HeadSpec, list[int]]] = {}
        for k, head in enumerate(self.config.heads):
            groups.setdefault(_layout_key(head), (head, []))[1].append(k)
        self._group_cache = [(key, head, idx) for key, (head, idx) in groups.items()]
        return self._group_cache

    def _head_tokens(self, baselines: list[Tensor]) -> Tensor:
        batch = baselines[0].shape[0]
        tokens = baselines[0].new_empty(batch, len(self.config.heads), self.config.width, dtype=torch.float32)
        if self.config.kind == "light":
            for key, head, idx in self._groups():
                chunks = torch.stack([baselines[k].float() for k in idx], dim=1).unflatten(
                    2, (len(head.roles), head.dim)
                )
                chunks = F.layer_norm(chunks, (head.dim,))
                basis = torch.stack(
                    [self.basis_in[_basis_key(r, head.dim)].weight for r in head.roles]
                )  # n, r, d
                coeffs = torch.einsum("bknd,nrd->bknr", chunks, basis).flatten(2)
                tokens[:, idx] = self.token_in[key](coeffs)
        else:
            for k, (head, m) in enumerate(zip(self.config.heads, baselines, strict=True)):
                tokens[:, k] = self.proj_in[k](F.layer_norm(m.float(), (head.width,)))
        return tokens + self.head_pos

    def _context_tokens(self, timestep: Tensor, cond: Tensor | None, xt: Tensor | None) -> Tensor:
        ctx = [self.time_embed(timestep_features(timestep, self.config.time_freqs))[:, None]]
        if self.cond_embed is not None:
            if cond is None:
                raise ValueError("this QRM needs a pooled condition (cond_dim > 0) but got none")
            ctx.append(self.cond_embed(cond.float())[:, None])
        if self.xt_embed is not None and xt is not None:
            pooled = F.adaptive_avg_pool2d(xt.float(), self.config.xt_pool).flatten(2).transpose(1, 2)
            ctx.append(self.xt_embed(pooled) + self.xt_pos)
        return torch.cat(ctx, dim=1)

    def forward(
        self, timestep: Tensor, cond: Tensor | None, baselines: list[Tensor], xt: Tensor | None = None
    ) -> list[Tensor]:
        """timestep (B,) in [0, 1]; cond (B, cond_dim); baselines[k] (B, n_k * d_k); xt (B, C, H, W) or None.
        Returns deltas[k] (B, n_k * d_k), float32."""
        if len(baselines) != len(self.config.heads):
            raise ValueError(f"expected {len(self.config.heads)} baseline vectors, got {len(baselines)}")
        heads = self._head_tokens(baselines)
        ctx = self._context_tokens(timestep, cond, xt)
        if self.config.kind == "light":
            x = torch.cat([heads, ctx], dim=1)
            for block in self.blocks:
                x = block(x)
            x = self.norm_out(x[:, : heads.shape[1]])
        else:
            x = heads
            for block in self.blocks:
                x = block(x, ctx)
            x = self.norm_out(x)
        deltas: list[Tensor] = [None] * len(self.config.heads)  # type: ignore[list-item]
        if self.config.kind == "light":
            rank = self.config.rank
            for _, head, idx in self._groups():
                w = torch.stack([self.coef_out[k].weight for k in idx])  # K, n*r, W
                b = torch.stack([self.coef_out[k].bias for k in idx])
                coeffs = (torch.einsum("bkw,kow->bko", x[:, idx], w) + b).unflatten(
                    2, (len(head.roles), rank)
                )
                basis = torch.stack(
                    [self.basis_out[_basis_key(r, head.dim)].weight for r in head.roles]
                )  # n, d, r
                out = torch.einsum("bknr,ndr->bknd", coeffs, basis).flatten(2)
                out = out + torch.stack([self.head_bias[k] for k in idx])
                for j, k in enumerate(idx):
                    deltas[k] = out[:, j]
        else:
            for k in range(len(self.config.heads)):
                deltas[k] = self.proj_out[k](x[:, k])
        return deltas
