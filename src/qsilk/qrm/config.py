"""``QRMConfig``: architecture, head layout, backbone identity and inference options of a QRM; JSON round-trip."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from torch import nn

from .heads import HeadSpec, backbone_family, backbone_params, config_hash, discover_heads

KINDS = ("light", "faithful")
CFG_ORDERS = ("auto", "uncond_cond", "cond_uncond")


@dataclass
class QRMConfig:
    """Everything needed to rebuild a QRM and to check that it fits a backbone.

    kind: "light" (shared per-role projections of rank ``rank`` + low-rank per-head outputs) or "faithful"
        (per-head full input/output projections and decoder blocks with cross-attention, as in the paper).
    heads: the backbone's adaLN head layout (see :mod:`qsilk.qrm.heads`).
    cond_dim: width of the pooled condition (class embedding / pooled text embedding).
    xt_channels / xt_pool: channels of x_t and the side of its adaptive average pooling (0 = x_t not used).
    window: active range in schedule progress (0 = first step, 1 = last), inclusive.
    apply_to_uncond: whether the unconditional half of a CFG batch gets a delta too.
    cfg_order: layout of a CFG batch for text models ("auto": the pipeline's ``cfg_order`` attribute if it has
        one, else diffusers' uncond-then-cond). Class-conditional DiTs find their null rows by label instead.
    """

    kind: str = "light"
    heads: list[HeadSpec] = field(default_factory=list)
    cond_dim: int = 0
    width: int = 48
    depth: int = 2
    num_heads: int = 4
    ffn_mult: int = 2
    rank: int = 8
    time_freqs: int = 32
    xt_channels: int = 0
    xt_pool: int = 2
    window: tuple[float, float] = (0.0, 1.0)
    apply_to_uncond: bool = False
    cfg_order: str = "auto"
    backbone_class: str = ""
    backbone_hash: str = ""
    backbone_params: int = 0

    def __post_init__(self) -> None:
        self.heads = [h if isinstance(h, HeadSpec) else HeadSpec.from_dict(h) for h in self.heads]
        self.window = tuple(float(w) for w in self.window)
        problems = []
        if self.kind not in KINDS:
            problems.append(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("width", "depth", "num_heads", "ffn_mult", "rank", "time_freqs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("cond_dim", "xt_channels", "xt_pool"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                problems.append(f"{name} must be a non-negative integer, got {value!r}")
        if (
            isinstance(self.width, int)
            and isinstance(self.num_heads, int)
            and self.num_heads > 0
            and self.width % self.num_heads
        ):
            problems.append(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if len(self.window) != 2 or not 0.0 <= self.window[0] <= self.window[1] <= 1.0:
            problems.append(f"window must be (start, end) with 0 <= start <= end <= 1, got {self.window}")
        if self.cfg_order not in CFG_ORDERS:
            problems.append(f"cfg_order must be one of {CFG_ORDERS}, got {self.cfg_order!r}")
        if not isinstance(self.apply_to_uncond, bool):
            problems.append(f"apply_to_uncond must be a bool, got {self.apply_to_uncond!r}")
        if problems:
            raise ValueError("invalid QRMConfig: " + "; ".join(problems))

    # -- construction from a backbone --------------------------------------------------------------------------

    @classmethod
    def for_transformer(cls, transformer: nn.Module, kind: str = "light", **overrides) -> QRMConfig:
        """A config sized for ``transformer``: ``light`` (small fixed width) or ``faithful`` (the paper's shape,
        width scaled by hidden / 1536 from SD3.5-M's 640, 6 decoder blocks, x_t pooled to 4x4)."""
        heads = discover_heads(transformer)
        family = backbone_family(transformer)
        base = dict(
            kind=kind,
            heads=heads,
            cond_dim=_cond_dim(transformer, family),
            xt_channels=_xt_channels(transformer, family),
            backbone_class=type(transformer).__name__,
            backbone_hash=config_hash(transformer),
            backbone_params=backbone_params(transformer),
        )
        if kind == "faithful":
            hidden = max(h.dim for h in heads)
            width = max(16, int(round(hidden * 640 / 1536 / 16)) * 16)
            base.update(width=width, depth=6, num_heads=max(1, width // 16), ffn_mult=4, xt_pool=4)
        elif kind != "light":
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        base.update(overrides)
        return cls(**base)

    # -- JSON ----------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = asdict(self)
        d["heads"] = [h.to_dict() for h in self.heads]
        d["window"] = list(self.window)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QRMConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"invalid QRMConfig: unknown keys {sorted(unknown)}")
        return cls(**d)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> QRMConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid QRMConfig JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError("invalid QRMConfig JSON: expected an object")
        return cls.from_dict(data)

    def check_backbone(self, transformer: nn.Module) -> None:
        """Raise ``ValueError`` naming the difference if this QRM was not built for ``transformer``."""
        name = type(transformer).__name__
        if self.backbone_class and self.backbone_class != name:
            raise ValueError(f"QRM was trained for a {self.backbone_class}, not a {name}")
        digest = config_hash(transformer)
        if self.backbone_hash and self.backbone_hash != digest:
            raise ValueError(
                f"QRM backbone mismatch: it was trained for a {self.backbone_class} with config hash "
                f"{self.backbone_hash}, this one has {digest} (different architecture config)"
            )
        heads = discover_heads(transformer)
        if [h.to_dict() for h in heads] != [h.to_dict() for h in self.heads]:
            mine = {h.name: h for h in self.heads}
            diff = [h.name for h in heads if mine.get(h.name) != h] + [
                n for n in mine if n not in {h.name for h in heads}
            ]
            raise ValueError(f"QRM head layout does not match the backbone (differs at: {diff[:4]})")


def _cond_dim(transformer: nn.Module, family: str) -> int:
    config = transformer.config
    if family == "dit":
        return int(transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.embedding_dim)
    if family == "pixart":
        return int(config.caption_channels)
    return int(config.pooled_projection_dim)


def _xt_channels(transformer: nn.Module, family: str) -> int:
    return int(transformer.config.in_channels)
