"""QSilk nodes for ComfyUI (V3 schema, ``comfy_api.latest``).

Thin on purpose: every decision lives in ``qsilk.integrations.comfyui`` (tested without ComfyUI); these classes
only declare inputs and call it. Install: link or copy this folder into ``ComfyUI/custom_nodes/`` and install the
``qsilk`` package into ComfyUI's Python (see README.md in this folder).
"""

from __future__ import annotations

try:
    from qsilk import QSilkConfig
    from qsilk.integrations import comfyui as qc
except ImportError as err:  # pragma: no cover - reported by ComfyUI's custom-node loader
    raise ImportError(
        "comfyui_qsilk needs the qsilk package in ComfyUI's Python environment: "
        "`python -m pip install /path/to/qsilk` (the repository root) with ComfyUI's python"
    ) from err

from comfy_api.latest import ComfyExtension, io

DEFAULTS = QSilkConfig()
CATEGORY = "sampling/qsilk"


def _preset_names() -> list[str]:
    names = QSilkConfig.preset_names() if hasattr(QSilkConfig, "preset_names") else []
    return ["custom", *[n for n in names if n != "custom"]]


def _window(prefix: str, window: tuple[float, float], what: str) -> list[io.Input]:
    return [
        io.Float.Input(
            f"{prefix}_window_start",
            default=window[0],
            min=0.0,
            max=1.0,
            step=0.01,
            tooltip=f"{what} acts from this point of the schedule on (0 = first step, 1 = last step).",
        ),
        io.Float.Input(
            f"{prefix}_window_end",
            default=window[1],
            min=0.0,
            max=1.0,
            step=0.01,
            tooltip=f"{what} acts up to this point of the schedule (0 = first step, 1 = last step).",
        ),
    ]


CONFIG_WIDGETS = [
    "clamp",
    "clamp_quantile",
    "clamp_mode",
    "clamp_per_channel",
    "clamp_softness",
    "clamp_window_start",
    "clamp_window_end",
    "aqclip",
    "aqclip_tile",
    "aqclip_stride",
    "aqclip_k_min",
    "aqclip_k_max",
    "aqclip_softness",
    "aqclip_window_start",
    "aqclip_window_end",
    "confidence",
    "ema",
    "placement",
]


class QSilkNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = DEFAULTS
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
                io.Combo.Input(
                    "preset",
                    options=_preset_names(),
                    default="custom",
                    tooltip="A named preset shipped with qsilk; 'custom' uses the widgets below.",
                ),
                io.Boolean.Input("clamp", default=d.clamp, tooltip="Micro-clamp on/off."),
                io.Float.Input(
                    "clamp_quantile",
                    default=d.clamp_quantile,
                    min=0.0001,
                    max=0.49,
                    step=0.0001,
                    tooltip="Per-sample corridor [Q_q, Q_(1-q)] over all values of x0; smaller q touches fewer values.",
                ),
                io.Combo.Input(
                    "clamp_mode",
                    options=["soft", "hard"],
                    default=d.clamp_mode,
                    tooltip="soft: smooth bounded saturation outside the corridor; hard: clamp to it.",
                ),
                io.Boolean.Input(
                    "clamp_per_channel",
                    default=d.clamp_per_channel,
                    tooltip="One corridor per latent channel instead of one per sample.",
                ),
                io.Float.Input(
                    "clamp_softness",
                    default=d.clamp_softness,
                    min=0.0,
                    max=2.0,
                    step=0.01,
                    tooltip="Soft mode: saturation margin as a fraction of the corridor half-width.",
                ),
                *_window("clamp", d.clamp_window, "The micro-clamp"),
                io.Boolean.Input(
                    "aqclip", default=d.aqclip, tooltip="AQClip (adaptive per-tile corridor) on/off."
                ),
                io.Int.Input(
                    "aqclip_tile",
                    default=d.aqclip_tile,
                    min=1,
                    max=256,
                    tooltip="Tile size in latent pixels for the local mean/std.",
                ),
                io.Int.Input(
                    "aqclip_stride",
                    default=d.aqclip_stride,
                    min=1,
                    max=256,
                    tooltip="Tile stride in latent pixels (must not exceed the tile).",
                ),
                io.Float.Input(
                    "aqclip_k_min",
                    default=d.aqclip_k_min,
                    min=0.0,
                    max=20.0,
                    step=0.05,
                    tooltip="Corridor half-width in local std where confidence is 0 (narrowest).",
                ),
                io.Float.Input(
                    "aqclip_k_max",
                    default=d.aqclip_k_max,
                    min=0.0,
                    max=20.0,
                    step=0.05,
                    tooltip="Corridor half-width in local std where confidence is 1 (widest); >= k_min.",
                ),
                io.Float.Input(
                    "aqclip_softness",
                    default=d.aqclip_softness,
                    min=0.0,
                    max=2.0,
                    step=0.01,
                    tooltip="Saturation margin as a fraction of the AQClip corridor half-width.",
                ),
                *_window("aqclip", d.aqclip_window, "AQClip"),
                io.Combo.Input(
                    "confidence",
                    options=["structure", "attention", "uniform"],
                    default=d.confidence or "uniform",
                    tooltip=(
                        "Where the corridor widens: structure (gradient energy of x0), attention (needs the "
                        "'QSilk attention confidence' node on the model) or uniform."
                    ),
                ),
                io.Float.Input(
                    "ema",
                    default=d.ema,
                    min=0.0,
                    max=0.99,
                    step=0.01,
                    tooltip="EMA of the AQClip corridor across steps (0 = off).",
                ),
                io.Combo.Input(
                    "placement",
                    options=["x0", "final"],
                    default=d.placement,
                    tooltip="x0: every step's guided x0; final: only the last step's (the reference placement).",
                ),
                io.String.Input(
                    "config_json",
                    default="",
                    multiline=True,
                    tooltip="Optional QSilkConfig JSON; the keys it sets override the widgets (or the preset).",
                ),
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
        values = {name: widgets[name] for name in CONFIG_WIDGETS if name in widgets}
        config = qc.config_from_inputs(values, config_json, preset)
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
