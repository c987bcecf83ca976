"""QSilk nodes for ComfyUI (V3 schema, ``comfy_api.latest``).

Thin on purpose: every decision lives in ``qsilk.integrations.comfyui`` (tested without ComfyUI); these classes
only declare inputs and call it. Install: link or copy this folder into ``ComfyUI/custom_nodes/`` and install the
``qsilk`` package into ComfyUI's Python (see README.md in this folder).
"""

from __future__ import annotations

import dataclasses

try:
    from qsilk import QSilkConfig
    from qsilk import config as qsilk_config
    from qsilk.integrations import comfyui as qc
except ImportError as err:  # pragma: no cover - reported by ComfyUI's custom-node loader
    raise ImportError(
        "comfyui_qsilk needs the qsilk package in ComfyUI's Python environment: "
        "`python -m pip install /path/to/qsilk` (the repository root) with ComfyUI's python"
    ) from err

from comfy_api.latest import ComfyExtension, io

DEFAULTS = QSilkConfig()
CATEGORY = "sampling/qsilk"
ATTENTION_FIELDS = ("attention_layers", "attention_max_queries", "attention_max_heads", "attention_ema")
PAIR_TOOLTIPS = {
    "clamp_window": "The micro-clamp acts from / up to this point of the schedule (0 = first step, 1 = last).",
    "aqclip_window": "AQClip acts from / up to this point of the schedule (0 = first step, 1 = last).",
    "hf_restore_window": "The high-frequency restore acts from / up to this point of the schedule.",
    "aqclip_edge_range": "Edge gate: AQClip's change is kept below the first confidence, given back above the second.",
}


def _preset_names() -> list[str]:
    names = QSilkConfig.preset_names() if hasattr(QSilkConfig, "preset_names") else []
    return ["custom", *[n for n in names if n != "custom"]]


def _float(name: str, default: float, low: float, high: float, step: float, tooltip: str) -> io.Float.Input:
    return io.Float.Input(name, default=default, min=low, max=high, step=step, tooltip=tooltip)


def _bool(name: str, default: bool, tooltip: str) -> io.Boolean.Input:
    return io.Boolean.Input(name, default=default, tooltip=tooltip)


def _combo(name: str, options: list[str], default: str, tooltip: str) -> io.Combo.Input:
    return io.Combo.Input(name, options=options, default=default, tooltip=tooltip)


def _field_inputs(name: str, value) -> list[io.Input]:
    """The widget(s) of one QSilkConfig field, with its range and tooltip."""
    if name in qc.pair_fields():
        tip = PAIR_TOOLTIPS.get(name, f"{name}: (low, high), both in [0, 1].")
        return [
            _float(f"{name}_start", value[0], 0.0, 1.0, 0.01, tip),
            _float(f"{name}_end", value[1], 0.0, 1.0, 0.01, tip),
        ]
    tile_default = value if isinstance(value, int) else None
    specs = {
        "clamp": lambda: _bool(name, value, "Micro-clamp on/off."),
        "clamp_quantile": lambda: _float(
            name,
            value,
            0.0001,
            0.49,
            0.0001,
            "Per-sample corridor [Q_q, Q_(1-q)] of x0; smaller q touches less.",
        ),
        "clamp_mode": lambda: _combo(
            name,
            ["soft", "hard"],
            value,
            "soft: smooth bounded saturation outside the corridor; hard: clamp.",
        ),
        "clamp_per_channel": lambda: _bool(
            name, value, "One corridor per latent channel instead of per sample."
        ),
        "clamp_softness": lambda: _float(
            name,
            value,
            0.0,
            2.0,
            0.01,
            "Soft mode: saturation margin, as a fraction of the corridor half-width.",
        ),
        "aqclip": lambda: _bool(name, value, "AQClip (adaptive per-tile corridor) on/off."),
        "aqclip_tile": lambda: io.Int.Input(
            name,
            default=tile_default or 16,
            min=1,
            max=256,
            tooltip="Tile size in latent pixels (local mean/std).",
        ),
        "aqclip_stride": lambda: io.Int.Input(
            name,
            default=tile_default or 8,
            min=1,
            max=256,
            tooltip="Tile stride in latent pixels (<= the tile).",
        ),
        "aqclip_k_min": lambda: _float(
            name,
            value,
            0.0,
            20.0,
            0.05,
            "Corridor half-width in local std where confidence is 0 (narrowest).",
        ),
        "aqclip_k_max": lambda: _float(
            name, value, 0.0, 20.0, 0.05, "Corridor half-width in local std where confidence is 1 (widest)."
        ),
        "aqclip_softness": lambda: _float(
            name, value, 0.0, 2.0, 0.01, "Saturation margin, as a fraction of the AQClip corridor half-width."
        ),
        "aqclip_edge_gate": lambda: _bool(
            name, value, "Give AQClip's change back where the confidence is high (see aqclip_edge_range)."
        ),
        "hf_restore": lambda: _float(
            name, value, 0.0, 1.0, 0.01, "Give back this share of the high-frequency energy the clip removed."
        ),
        "confidence": lambda: _combo(
            name,
            ["structure", "attention", "uniform"],
            value or "uniform",
            "Where the corridor widens: structure (gradient energy of x0), attention (needs the "
            "'QSilk attention confidence' node on the model) or uniform.",
        ),
        "ema": lambda: _float(
            name, value, 0.0, 0.99, 0.01, "EMA of the AQClip corridor across steps (0 = off)."
        ),
        "placement": lambda: _combo(
            name,
            ["x0", "final"],
            value,
            "x0: every step's guided x0; final: only the last step's (reference).",
        ),
    }
    if name in specs:
        return [specs[name]()]
    # a field this pack does not know yet: a plain widget of its type, so it is still settable
    if isinstance(value, bool):
        return [_bool(name, value, name)]
    if isinstance(value, int):
        return [io.Int.Input(name, default=value, tooltip=name)]
    if isinstance(value, float):
        return [io.Float.Input(name, default=value, step=0.01, tooltip=name)]
    return []  # other types: through config_json


# The first release's options, in a fixed order. UI-format workflows store widget values by position, so options
# added to QSilkConfig later are appended after config_json (see config_inputs), never inserted before it.
STABLE_FIELDS = (
    "clamp",
    "clamp_quantile",
    "clamp_mode",
    "clamp_per_channel",
    "clamp_softness",
    "clamp_window",
    "aqclip",
    "aqclip_tile",
    "aqclip_stride",
    "aqclip_k_min",
    "aqclip_k_max",
    "aqclip_softness",
    "aqclip_window",
    "confidence",
    "ema",
    "placement",
)


def _optional(inputs: list[io.Input]) -> list[io.Input]:
    # optional: a workflow that omits an option (e.g. one saved before it existed) gets the config default
    for item in inputs:
        item.optional = True
    return inputs


def config_inputs() -> tuple[list[io.Input], list[io.Input]]:
    """(stable, newer) widgets: one per QSilkConfig option (pairs as two); attention_* are on the attention
    node."""
    names = [f.name for f in dataclasses.fields(QSilkConfig) if f.name not in ATTENTION_FIELDS]
    stable = [
        w for name in STABLE_FIELDS if name in names for w in _field_inputs(name, getattr(DEFAULTS, name))
    ]
    newer = [
        w for name in names if name not in STABLE_FIELDS for w in _field_inputs(name, getattr(DEFAULTS, name))
    ]
    if getattr(qsilk_config, "AUTO", None):
        newer.append(
            _bool(
                "aqclip_auto_tile",
                DEFAULTS.aqclip_tile == "auto",
                "Tile and stride scale with the latent size (overrides aqclip_tile and aqclip_stride).",
            )
        )
    return _optional(stable), _optional(newer)


class QSilkNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        stable, newer = config_inputs()
        return io.Schema(
            node_id="QSilk",
            display_name="QSilk (micro-clamp + AQClip)",
            category=CATEGORY,
            description=(
                "Applies qsilk.QSilk to the guided x0 at every sampler step through a post-CFG function: chains "
                "with RescaleCFG, APG and other post-CFG nodes, works at CFG 1, adds no model evaluation."
            ),
            inputs=[
                io.Model.Input("model"),
                _combo(
                    "preset",
                    _preset_names(),
                    "custom",
                    "A preset shipped with qsilk; 'custom' uses the widgets.",
                ),
                *stable,
                io.String.Input(
                    "config_json",
                    default="",
                    multiline=True,
                    tooltip="Optional QSilkConfig JSON; the keys it sets override the widgets (or the preset).",
                ),
                *newer,
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, preset: str, config_json: str) -> bool | str:
        # Named arguments only: ComfyUI still range-checks every other input itself.
        try:
            qc.config_from_inputs({}, config_json, preset)
        except ValueError as err:
            return str(err)
        return True

    @classmethod
    def execute(cls, model, preset: str, config_json: str, **widgets) -> io.NodeOutput:
        config = qc.config_from_inputs(widgets, config_json, preset)
        patched, _ = qc.patch_model(model, config)
        return io.NodeOutput(patched)


class QSilkAttentionConfidenceNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = DEFAULTS
        return io.Schema(
            node_id="QSilkAttentionConfidence",
            display_name="QSilk attention confidence",
            category=CATEGORY,
            description=(
                "Records self-attention entropy (conditional rows, true latent aspect) through "
                "optimized_attention_override, chaining any override already set; QSilk with confidence="
                "'attention' uses it. The attention itself is not changed."
            ),
            inputs=[
                io.Model.Input("model"),
                io.Int.Input(
                    "max_queries",
                    default=d.attention_max_queries,
                    min=1,
                    max=16384,
                    tooltip="Queries sampled per attention call, on an evenly strided sub-grid.",
                ),
                io.Int.Input(
                    "max_heads",
                    default=d.attention_max_heads,
                    min=1,
                    max=64,
                    tooltip="Heads sampled per call.",
                ),
                io.Float.Input(
                    "ema",
                    default=d.attention_ema,
                    min=0.0,
                    max=0.99,
                    step=0.01,
                    tooltip="EMA of the entropy map across steps (0 = off).",
                ),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, max_queries: int, max_heads: int, ema: float) -> io.NodeOutput:
        patched, _ = qc.patch_attention(model, max_queries=max_queries, max_heads=max_heads, ema=ema)
        return io.NodeOutput(patched)


class QSilkPreviewNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QSilkPreview",
            display_name="QSilk preview",
            category=CATEGORY,
            description=(
                "The last run's AQClip confidence map and |x0' - x0| (summed over steps, channel mean) of the "
                "QSilk on this model, as images. Connect the sampler's LATENT so it runs after sampling."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model output of the QSilk node (or anything after it)."),
                io.Latent.Input("samples", tooltip="The sampler's output; orders this node after it."),
                io.Int.Input(
                    "upscale", default=8, min=1, max=16, tooltip="Nearest-neighbour upscale per latent pixel."
                ),
                io.Boolean.Input(
                    "normalize", default=True, tooltip="Scale the change map so its maximum is white."
                ),
            ],
            outputs=[io.Image.Output(display_name="confidence"), io.Image.Output(display_name="change")],
        )

    @classmethod
    def execute(cls, model, samples, upscale: int, normalize: bool) -> io.NodeOutput:
        functions = qc.find_post_cfg(model.model_options)
        if not functions:
            raise ValueError(
                "QSilk preview: the model has no QSilk node applied (connect the QSilk node's MODEL)"
            )
        latent_hw = tuple(samples["samples"].shape[-2:])
        confidence, change = qc.preview_images(
            functions[-1], upscale=upscale, normalize=normalize, latent_hw=latent_hw
        )
        return io.NodeOutput(confidence, change)


class QSilkExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [QSilkNode, QSilkAttentionConfidenceNode, QSilkPreviewNode]


async def comfy_entrypoint() -> QSilkExtension:
    return QSilkExtension()
