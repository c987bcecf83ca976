"""AttentionEntropyProbe on tiny random-weight diffusers denoisers (UNet, SD3, Flux, DiT, PixArt)."""

import contextlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

pytest.importorskip("diffusers")
from diffusers.models.attention_processor import AttnProcessor  # noqa: E402

import qsilk.attention.probe as probe_module  # noqa: E402
from qsilk.attention import AttentionEntropyProbe, default_layer_names, select_layers  # noqa: E402
from tiny_pipelines import (  # noqa: E402
    tiny_dit_transformer,
    tiny_flux_transformer,
    tiny_pixart_transformer,
    tiny_sd3_transformer,
    tiny_unet,
)

torch.set_num_threads(1)

LATENT_HW = (24, 40)  # non-square on purpose: a square reshape of the tokens would scramble it
TEXT_TOKENS = 7


# -- tiny models and their inputs ------------------------------------------------------------------------------------


def make_unet(sd15_layout=False):
    if sd15_layout:
        blocks = dict(
            block_out_channels=(8, 16, 16, 16),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
    else:
        blocks = dict(
            block_out_channels=(16, 32, 32),
            down_block_types=("CrossAttnDownBlock2D",) * 3,
            up_block_types=("CrossAttnUpBlock2D",) * 3,
        )
    return tiny_unet(cross_attention_dim=16, **blocks)


def unet_inputs(batch=2, hw=LATENT_HW, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, *hw, generator=gen),
        timestep=torch.full((batch,), 500),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 16, generator=gen),
    )


def make_sd3():
    return tiny_sd3_transformer(
        num_layers=3,
        num_attention_heads=4,
        joint_attention_dim=16,
        caption_projection_dim=32,
        pooled_projection_dim=16,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),
    )


def sd3_inputs(batch=2, hw=LATENT_HW, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, *hw, generator=gen),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 16, generator=gen),
        pooled_projections=torch.randn(batch, 16, generator=gen),
        timestep=torch.full((batch,), 500.0),
    )


def make_flux():
    return tiny_flux_transformer(
        num_layers=2, num_single_layers=2, num_attention_heads=4, joint_attention_dim=16, pooled_projection_dim=16
    )


def flux_image_ids(h, w):
    """As FluxPipeline._prepare_latent_image_ids: token i of the packed latent sits at (row, col) = divmod(i, w)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def flux_inputs(batch=1, hw=LATENT_HW, seed=1):
    gen = torch.Generator().manual_seed(seed)
    h, w = hw[0] // 2, hw[1] // 2  # 2x2 packing of the latent
    return dict(
        hidden_states=torch.randn(batch, h * w, 16, generator=gen),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 16, generator=gen),
        pooled_projections=torch.randn(batch, 16, generator=gen),
        timestep=torch.full((batch,), 0.5),
        img_ids=flux_image_ids(h, w),
        txt_ids=torch.zeros(TEXT_TOKENS, 3),
    )


def make_dit():
    return tiny_dit_transformer(out_channels=4, sample_size=8, num_embeds_ada_norm=10)


def dit_inputs(batch=2, hw=LATENT_HW, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, *hw, generator=gen),
        timestep=torch.full((batch,), 5),
        class_labels=torch.tensor([3, 1] * (batch // 2) + [1] * (batch % 2)),
    )


def make_pixart():
    return tiny_pixart_transformer(sample_size=8, caption_channels=16)


def pixart_inputs(batch=2, hw=LATENT_HW, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, *hw, generator=gen),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 16, generator=gen),
        timestep=torch.full((batch,), 500),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


# name: (model, inputs, latent (H, W)); diffusers' DiT unpatchifies square inputs only.
ARCHITECTURES = {
    "unet": (make_unet, unet_inputs, LATENT_HW),
    "sd3": (make_sd3, sd3_inputs, LATENT_HW),
    "flux": (make_flux, flux_inputs, LATENT_HW),
    "dit": (make_dit, dit_inputs, (16, 16)),
    "pixart": (make_pixart, pixart_inputs, LATENT_HW),
}


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


# -- independent attention computation --------------------------------------------------------------------------------


def explicit_entropy(q, k):
    """Row entropies of softmax(q k^T / sqrt(d)) in float64; q (B, H, Q, D), k (B, H, K, D)."""
    logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    p = torch.softmax(logits, dim=-1)
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)


def rotate_pairs(x, cos, sin):
    """RoPE as Flux defines it: consecutive channel pairs (x0, x1) rotated by the angle of (cos, sin)[2i].

    x (B, S, H, D); cos, sin (S, D) with each value repeated for the two channels of a pair.
    """
    pairs = torch.complex(x[..., 0::2].double(), x[..., 1::2].double())
    turn = torch.complex(cos[:, 0::2].double(), sin[:, 0::2].double())[None, :, None, :]
    rotated = pairs * turn
    return torch.stack([rotated.real, rotated.imag], dim=-1).flatten(-2)


class Capture:
    """Forward hooks that keep the outputs of named submodules of each probed attention layer."""

    def __init__(self, layers, parts):
        self.outputs = {layer.name: {} for layer in layers}
        self.kwargs = {}
        self.handles = []
        for layer in layers:
            for part in parts:
                sub = getattr(layer.module, part, None)
                if sub is not None:
                    self.handles.append(sub.register_forward_hook(self._keep(layer.name, part)))
            self.handles.append(
                layer.module.register_forward_pre_hook(self._keep_kwargs(layer.name), with_kwargs=True)
            )

    def _keep(self, name, part):
        def hook(module, args, output):
            self.outputs[name][part] = output.detach()

        return hook

    def _keep_kwargs(self, name):
        def hook(module, args, kwargs):
            self.kwargs[name] = dict(kwargs)

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def heads_view(x, heads):
    """(B, S, heads * D) -> (B, heads, S, D)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def assert_parity(record, entropy_all):
    """Probe entropy at its sampled (batch, head, query) == the independent one, to 1e-5."""
    expected = entropy_all[record.batch_rows[0] : record.batch_rows[1]][:, record.head_index][
        :, :, record.token_index
    ]
    got = record.entropy.flatten(2).double()
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# -- entropy parity ---------------------------------------------------------------------------------------------------


def test_parity_unet_self_attention():
    unet = make_unet()
    probe = AttentionEntropyProbe(unet, layers=["*attn1"], max_queries=50, max_heads=3, cfg_batched=True)
    capture = Capture(probe.layers, ["to_q", "to_k"])
    with probe:
        run(unet, unet_inputs())
        records = probe.records
    capture.remove()
    assert set(records) == set(probe.layer_names) and len(records) == 10
    grids = {record.grid_hw for record in records.values()}
    assert grids == {(24, 40), (12, 20), (6, 10)}
    for layer in probe.layers:
        attn, out = layer.module, capture.outputs[layer.name]
        # diffusers' own eager path: get_attention_scores over (batch * heads, seq, dim).
        q, k = attn.head_to_batch_dim(out["to_q"]), attn.head_to_batch_dim(out["to_k"])
        probs = attn.get_attention_scores(q, k, None).double()
        entropy = -(probs * torch.log(probs.clamp_min(1e-300))).sum(-1)
        record = records[layer.name]
        assert (
            record.batch_rows == (1, 2)
            and record.token_index.numel() <= 50
            and record.head_index.numel() == 3
        )
        assert_parity(record, entropy.unflatten(0, (2, attn.heads)))


def test_parity_sd3_joint_attention():
    model = make_sd3()
    layers = ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.2.attn"]
    probe = AttentionEntropyProbe(model, layers=layers, max_queries=40, max_heads=4, cfg_batched=True)
    assert [layer.layout for layer in probe.layers] == ["image_first", "self", "image_first"]
    capture = Capture(probe.layers, ["to_q", "to_k", "add_q_proj", "add_k_proj"])
    with probe:
        run(model, sd3_inputs())
        records = probe.records
    capture.remove()
    image_tokens = (LATENT_HW[0] // 2) * (LATENT_HW[1] // 2)
    for layer in probe.layers:
        attn, out = layer.module, capture.outputs[layer.name]
        q, k = (
            attn.norm_q(heads_view(out["to_q"], attn.heads)),
            attn.norm_k(heads_view(out["to_k"], attn.heads)),
        )
        if layer.layout == "image_first":  # SD3 joins [image, text] along the sequence
            q = torch.cat([q, attn.norm_added_q(heads_view(out["add_q_proj"], attn.heads))], dim=2)
            k = torch.cat([k, attn.norm_added_k(heads_view(out["add_k_proj"], attn.heads))], dim=2)
            assert k.shape[2] == image_tokens + TEXT_TOKENS
        record = records[layer.name]
        assert record.grid_hw == (12, 20) and int(record.token_index.max()) < image_tokens
        assert_parity(record, explicit_entropy(q, k))


def test_parity_flux_double_and_single_blocks():
    model = make_flux()
    layers = ["transformer_blocks.*.attn", "single_transformer_blocks.*.attn"]
    probe = AttentionEntropyProbe(model, layers=layers, max_queries=30, max_heads=2)
    capture = Capture(probe.layers, ["to_q", "to_k", "add_q_proj", "add_k_proj"])
    with probe:
        run(model, flux_inputs(batch=2))
        records = probe.records
    capture.remove()
    assert len(records) == 4
    for layer in probe.layers:
        attn, out = layer.module, capture.outputs[layer.name]
        q, k = (
            attn.norm_q(out["to_q"].unflatten(-1, (attn.heads, -1))),
            attn.norm_k(out["to_k"].unflatten(-1, (attn.heads, -1))),
        )
        if "add_q_proj" in out:  # double block: Flux joins [text, image]
            q = torch.cat([attn.norm_added_q(out["add_q_proj"].unflatten(-1, (attn.heads, -1))), q], dim=1)
            k = torch.cat([attn.norm_added_k(out["add_k_proj"].unflatten(-1, (attn.heads, -1))), k], dim=1)
        cos, sin = capture.kwargs[layer.name]["image_rotary_emb"]
        q, k = rotate_pairs(q, cos, sin).transpose(1, 2), rotate_pairs(k, cos, sin).transpose(1, 2)
        record = records[layer.name]
        assert record.grid_hw == (12, 20) and record.batch_rows == (0, 2)
        assert int(record.token_index.min()) >= TEXT_TOKENS  # image queries only
        assert_parity(record, explicit_entropy(q, k))


# -- outputs untouched, clean removal ---------------------------------------------------------------------------------


def hook_counts(model):
    return {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_outputs_bit_identical_and_remove_restores(arch):
    make, inputs_for, latent_hw = ARCHITECTURES[arch]
    model, inputs = make(), inputs_for(hw=latent_hw)
    reference = run(model, inputs)
    processors = {n: m.processor for n, m in model.named_modules() if hasattr(m, "set_processor")}
    hooks_before = hook_counts(model)
    probe = AttentionEntropyProbe(model, cfg_batched=arch != "flux")
    with probe:
        assert torch.equal(run(model, inputs), reference)
        assert set(probe.records) == set(probe.layer_names)
        batch = inputs["hidden_states" if arch != "unet" else "sample"].shape[0]
        confidence = probe.confidence(latent_hw, batch if arch == "flux" else batch // 2)
        assert confidence is not None and confidence.shape[-2:] == latent_hw
        assert confidence.min() >= 0 and confidence.max() <= 1
    assert not probe.installed
    assert hook_counts(model) == hooks_before
    assert all(m.processor is processors[n] for n, m in model.named_modules() if hasattr(m, "set_processor"))
    assert torch.equal(run(model, inputs), reference)


def test_bit_identical_in_bfloat16():
    model, inputs = make_unet().to(torch.bfloat16), unet_inputs()
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    reference = run(model, inputs)
    with AttentionEntropyProbe(model, layers=["*attn1"], cfg_batched=True) as probe:
        assert torch.equal(run(model, inputs), reference)
        assert probe.confidence(LATENT_HW, 1).dtype == torch.float32


def test_install_is_idempotent_and_reusable():
    model, inputs = make_unet(), unet_inputs()
    probe = AttentionEntropyProbe(model)
    hooks_before = hook_counts(model)
    probe.install()
    probe.install()
    assert sum(pre + post for pre, post in hook_counts(model).values()) == 2 + 2 * len(probe.layers)
    probe.remove()
    probe.remove()
    assert hook_counts(model) == hooks_before
    with probe:
        run(model, inputs)
        assert probe.confidence(LATENT_HW, 2) is not None


# -- spatial alignment and the conditional half -----------------------------------------------------------------------


def in_region(h, w, region):
    """Boolean (h, w) mask of a region given as fractions (top, bottom, left, right) of the grid."""
    top, bottom, left, right = region
    rows = (torch.arange(h) + 0.5) / h
    cols = (torch.arange(w) + 0.5) / w
    return ((rows >= top) & (rows < bottom))[:, None] & ((cols >= left) & (cols < right))[None, :]


SHARPEN = 100.0  # query gain inside a region: attention rows there are near one-hot (confidence close to 1)


def sharpen_queries(module, grid_of, regions_per_sample, image_tokens_last=False, gain=SHARPEN):
    """Forward hook scaling queries: x gain inside a sample's region (peaked attention, low entropy), 0 elsewhere
    (uniform attention, maximal entropy). ``grid_of(num_tokens)`` gives the (h, w) grid of the image tokens."""

    def hook(mod, args, output):
        scale = torch.zeros(output.shape[:2])  # (B, S)
        for b, region in enumerate(regions_per_sample):
            n_image = output.shape[1] - (TEXT_TOKENS if image_tokens_last else 0)
            h, w = grid_of(n_image)
            scale[b, output.shape[1] - n_image :] = gain * in_region(h, w, region).flatten().float()
        return output * scale.view(*scale.shape, *([1] * (output.ndim - 2)))

    return module.register_forward_hook(hook)


@contextlib.contextmanager
def removing(handles):
    """The hooks (e.g. of sharpen_queries) stay for the block and are removed on exit, also on failure."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


TOP_RIGHT = (0.0, 0.5, 0.7, 1.0)
BOTTOM_LEFT = (0.5, 1.0, 0.0, 0.3)


def region_stats(confidence, region):
    """(min well inside the region, max well outside it, mean inside): a 3-cell margin around its edge is dropped,
    where the bilinear resize of the sampled grid blends the two."""
    h, w = confidence.shape[-2:]
    inside = in_region(h, w, region)[None, None].float()
    grown = torch.nn.functional.max_pool2d(inside, 7, 1, 3)[0, 0] > 0
    shrunk = -torch.nn.functional.max_pool2d(-inside, 7, 1, 3)[0, 0] > 0
    return confidence[..., shrunk].min(), confidence[..., ~grown].max(), confidence[..., shrunk].mean()


def assert_highlights(confidence, region):
    low_inside, high_outside, _ = region_stats(confidence, region)
    assert low_inside > 0.8 and high_outside < 0.2, (low_inside, high_outside)


def unet_grid(n):
    for f in (1, 2, 4, 8):
        if (LATENT_HW[0] // f) * (LATENT_HW[1] // f) == n:
            return LATENT_HW[0] // f, LATENT_HW[1] // f
    raise AssertionError(n)


def test_alignment_unet_non_square():
    unet = make_unet()
    probe = AttentionEntropyProbe(unet, layers=["*attn1"], max_queries=64)
    handles = [sharpen_queries(layer.module.to_q, unet_grid, [TOP_RIGHT]) for layer in probe.layers]
    with removing(handles), probe:
        run(unet, unet_inputs(batch=1))
        confidence = probe.confidence(LATENT_HW, 1)
    assert_highlights(confidence, TOP_RIGHT)


def test_alignment_flux_packed_latent():
    model = make_flux()
    probe = AttentionEntropyProbe(model, layers=["*transformer_blocks.*.attn"], max_queries=64)
    packed = (LATENT_HW[0] // 2, LATENT_HW[1] // 2)
    # Flux normalises q per head (RMSNorm), so sharpen after norm_q. Single blocks see [text, image] tokens.
    handles = [
        sharpen_queries(
            layer.module.norm_q, lambda n: packed, [TOP_RIGHT], image_tokens_last="single" in layer.name
        )
        for layer in probe.layers
    ]
    with removing(handles), probe:
        run(model, flux_inputs(batch=1))
        confidence = probe.confidence(LATENT_HW, 1)
    assert_highlights(confidence, TOP_RIGHT)


def test_cfg_batch_reads_the_conditional_half():
    unet = make_unet()
    regions = [BOTTOM_LEFT, TOP_RIGHT]  # [uncond, cond] as diffusers orders a CFG batch
    cfg_flag = {"on": True}
    probe = AttentionEntropyProbe(unet, layers=["*attn1"], cfg_batched=lambda: cfg_flag["on"])
    handles = [sharpen_queries(layer.module.to_q, unet_grid, regions) for layer in probe.layers]
    with removing(handles), probe:
        run(unet, unet_inputs(batch=2))
        confidence = probe.confidence(LATENT_HW, 1)
        assert confidence.shape == (1, 1, *LATENT_HW)
        # The conditional sample's pattern, not the unconditional one.
        assert_highlights(confidence, TOP_RIGHT)
        cfg_flag["on"] = False  # read at every forward: now both samples are maps of their own
        run(unet, unet_inputs(batch=2))
        both = probe.confidence(LATENT_HW, 2)
        assert_highlights(both[:1], BOTTOM_LEFT)
        assert_highlights(both[1:], TOP_RIGHT)


def test_cfg_auto_and_order():
    """ "auto" tells a CFG batch from the latent batch size; cfg_order picks the half (DiTPipeline: cond first)."""
    unet = make_unet()
    regions = [BOTTOM_LEFT, TOP_RIGHT]
    handles = []  # registered once the first probe is on, kept for the second
    with removing(handles):
        with AttentionEntropyProbe(unet, layers=["*attn1"]) as probe:
            handles += [sharpen_queries(layer.module.to_q, unet_grid, regions) for layer in probe.layers]
            run(unet, unet_inputs(batch=2))
            assert_highlights(probe.confidence(LATENT_HW, 1), TOP_RIGHT)
            run(unet, unet_inputs(batch=2))
            both = probe.confidence(LATENT_HW, 2)  # denoiser batch == latent batch: no CFG batching
            assert_highlights(both[:1], BOTTOM_LEFT)
            assert_highlights(both[1:], TOP_RIGHT)
            with pytest.raises(ValueError, match="batch_size"):
                probe.confidence(LATENT_HW)
        with AttentionEntropyProbe(
            unet, layers=["*attn1"], cfg_batched=True, cfg_order="cond_uncond"
        ) as probe:
            run(unet, unet_inputs(batch=2))
            assert_highlights(probe.confidence(LATENT_HW, 1), BOTTOM_LEFT)


def test_separate_forwards_keep_the_first_one():
    """Unbatched CFG (e.g. Flux true CFG) runs cond first: the probe keeps the step's first forward."""
    unet = make_unet()
    with AttentionEntropyProbe(unet, layers=["*attn1"]) as probe:
        run(unet, unet_inputs(batch=1, seed=1))
        first = probe.records
        run(unet, unet_inputs(batch=1, seed=2))
        assert all(torch.equal(first[n].entropy, r.entropy) for n, r in probe.records.items())
        probe.confidence(LATENT_HW, 1)
        run(unet, unet_inputs(batch=1, seed=2))
        assert not torch.equal(
            first[probe.layer_names[0]].entropy, probe.records[probe.layer_names[0]].entropy
        )


# -- the absolute level -------------------------------------------------------------------------------------------

# the 24 x 40 token grid of LATENT_HW
FULL_RES_LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"


def test_confidence_is_one_minus_normalised_entropy_known_answer():
    """Every token and head sampled on a full-resolution layer: the map is exactly 1 - mean_heads(H / log N), with H
    from an independent float64 softmax of the layer's own q and k."""
    unet = make_unet()
    probe = AttentionEntropyProbe(
        unet, layers=[FULL_RES_LAYER], max_queries=10_000, max_heads=100, cfg_batched=False
    )
    capture = Capture(probe.layers, ["to_q", "to_k"])
    with probe:
        run(unet, unet_inputs(batch=2))
        confidence = probe.confidence(LATENT_HW, 2)
    capture.remove()
    attn, out = probe.layers[0].module, capture.outputs[FULL_RES_LAYER]
    entropy = explicit_entropy(heads_view(out["to_q"], attn.heads), heads_view(out["to_k"], attn.heads))
    tokens = LATENT_HW[0] * LATENT_HW[1]
    expected = 1 - (entropy / math.log(tokens)).mean(dim=1).view(2, 1, *LATENT_HW)
    torch.testing.assert_close(confidence.double(), expected, atol=1e-5, rtol=0)


def test_sharper_attention_gives_higher_confidence():
    """The same region sharpened more -> a higher confidence there; maps are not stretched to a fixed range."""
    unet = make_unet()
    levels = {}
    for gain in (3.0, 10.0, SHARPEN):
        probe = AttentionEntropyProbe(unet, layers=["*attn1"], cfg_batched=False)
        handles = [
            sharpen_queries(layer.module.to_q, unet_grid, [TOP_RIGHT], gain=gain) for layer in probe.layers
        ]
        with removing(handles), probe:
            run(unet, unet_inputs(batch=1))
            confidence = probe.confidence(LATENT_HW, 1)
        levels[gain] = float(region_stats(confidence, TOP_RIGHT)[2])
        # Outside the region queries are 0: uniform attention, normalised entropy 1, confidence 0.
        assert float(region_stats(confidence, TOP_RIGHT)[1]) < 1e-4
    assert levels[3.0] < levels[10.0] < levels[SHARPEN], levels
    # A per-sample min-max stretch would bring every one of these maps to the same ~1 inside the region.
    assert levels[3.0] < 0.6, levels


# -- memory and work ------------------------------------------------------------------------------------------------


class NewAllocations(TorchDispatchMode):
    """Records the largest storage (bytes) any op allocates; outputs that alias an input (views) are not new."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


class MaskedSelfAttention(torch.nn.Module):
    """A minimal attention module (duck-typed like diffusers' Attention) whose SDPA call carries ``attn_mask``."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.processor = None

    def set_processor(self, processor):
        self.processor = processor

    def forward(self, tokens, attn_mask):
        q, k, v = (heads_view(proj(tokens), self.heads) for proj in (self.to_q, self.to_k, self.to_v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).flatten(2)


class MaskedDenoiser(torch.nn.Module):
    def __init__(self, dim=16, heads=4):
        super().__init__()
        torch.manual_seed(0)
        self.attn = MaskedSelfAttention(dim, heads)

    def forward(self, sample, attn_mask):
        return self.attn(sample.flatten(2).transpose(1, 2), attn_mask)


MASK_GRID = (24, 24)


@pytest.mark.parametrize("shape", ["full", "key_padding", "shared"])
@pytest.mark.parametrize("as_bool", [True, False])
def test_mask_is_selected_before_any_copy(shape, as_bool):
    """The probe never copies the (rows x heads x N x N) mask: the largest tensor it makes is its own
    (rows x sampled heads x sampled queries x N) logits, and the masked entropy matches an independent one."""
    batch, heads, n = 2, 4, MASK_GRID[0] * MASK_GRID[1]
    gen = torch.Generator().manual_seed(3)
    allowed = torch.rand(batch, heads, n, n, generator=gen) > 0.4
    allowed[..., 0] = True  # every query may attend somewhere
    allowed = {"full": allowed, "key_padding": allowed[:, :1, :1], "shared": allowed[0, 0]}[shape]
    mask = allowed if as_bool else torch.zeros(allowed.shape).masked_fill(~allowed, -math.inf)
    model = MaskedDenoiser(heads=heads)
    sample = torch.randn(batch, 16, *MASK_GRID, generator=gen)
    probe = AttentionEntropyProbe(model, layers=["attn"], max_queries=16, max_heads=2, cfg_batched=True)
    tracer = NewAllocations()
    measure = probe._measure

    def traced_measure(*args):
        with tracer:
            return measure(*args)

    probe._measure = traced_measure
    capture = Capture(probe.layers, ["to_q", "to_k"])
    with probe, torch.no_grad():
        model(sample, mask)
        record = probe.records["attn"]
    capture.remove()
    rows, sampled_heads, sampled_queries = 1, 2, record.token_index.numel()
    logits_bytes = rows * sampled_heads * sampled_queries * n * 4  # fp32
    selected_mask_bytes = rows * sampled_heads * n * n * mask.element_size()
    assert 0 < tracer.largest <= logits_bytes < selected_mask_bytes / 4
    # Parity: softmax over the allowed keys only, float64, for the sampled (cond row, head, query).
    q = heads_view(capture.outputs["attn"]["to_q"], heads).double()
    k = heads_view(capture.outputs["attn"]["to_k"], heads).double()
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) / q.shape[-1] ** 0.5
    logits = logits.masked_fill(~torch.broadcast_to(allowed, logits.shape), -math.inf)
    p = torch.softmax(logits, dim=-1)
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)
    assert record.batch_rows == (1, 2)  # uncond_cond: the second half
    assert_parity(record, entropy)
    allowed_keys = torch.broadcast_to(allowed, logits.shape).sum(-1).double()
    expected_log_n = allowed_keys[1:][:, record.head_index][:, :, record.token_index].log()
    torch.testing.assert_close(record.log_num_keys.flatten(2).double(), expected_log_n)


def test_auto_cfg_measures_only_the_conditional_half(monkeypatch):
    """cfg_batched="auto": the entropy is computed for the rows confidence() keeps, never for the other half, and
    the map equals the one measured with cfg_batched=True."""
    unet = make_unet()
    measured_rows = []
    real_entropy = probe_module.attention_entropy

    def spy(query, key, **kwargs):
        measured_rows.append(query.shape[0])
        return real_entropy(query, key, **kwargs)

    monkeypatch.setattr(probe_module, "attention_entropy", spy)
    inputs = unet_inputs(batch=4)  # two samples, [uncond, uncond, cond, cond]
    with AttentionEntropyProbe(unet, layers=["*attn1"]) as probe:
        run(unet, inputs)
        assert measured_rows == []  # nothing measured during the forward: the cfg split is not known yet
        auto = probe.confidence(LATENT_HW, 2)
    assert measured_rows == [2] * len(probe.layers)
    measured_rows.clear()
    with AttentionEntropyProbe(unet, layers=["*attn1"], cfg_batched=True) as probe:
        run(unet, inputs)
        explicit = probe.confidence(LATENT_HW, 2)
    assert measured_rows == [2] * len(probe.layers)
    assert torch.equal(auto, explicit)
    # Without CFG batching (denoiser batch == latent batch) every row is measured, once.
    measured_rows.clear()
    with AttentionEntropyProbe(unet, layers=["*attn1"]) as probe:
        run(unet, inputs)
        assert probe.confidence(LATENT_HW, 4).shape[0] == 4
    assert measured_rows == [4] * len(probe.layers)


# -- fallback warnings ------------------------------------------------------------------------------------------------


def test_layer_bypassing_sdpa_warns_once_and_returns_none():
    unet = make_unet()
    probe = AttentionEntropyProbe(unet)
    bypassed = probe.layers[0].module
    original = bypassed.processor
    # The eager baddbmm/softmax processor makes no SDPA call, like flash/sage/xformers backends.
    bypassed.set_processor(AttnProcessor())
    with probe:
        run(unet, unet_inputs())
        with pytest.warns(RuntimeWarning, match="recorded nothing.*scaled_dot_product_attention") as caught:
            assert probe.confidence(LATENT_HW, 2) is None
        assert probe.layer_names[0] in str(caught[0].message)
        # ... and the reason stays readable after the one warning, for the records (confidence_source)
        assert probe.last_problem.startswith(f"1 of {len(probe.layers)} probed layers recorded nothing")
        assert (
            probe.layer_names[0] in probe.last_problem
            and "scaled_dot_product_attention" in probe.last_problem
        )
        run(unet, unet_inputs())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert probe.confidence(LATENT_HW, 2) is None  # still no map, but said only once
        assert probe.last_problem is not None
        bypassed.set_processor(original)
        run(unet, unet_inputs())
        assert probe.confidence(LATENT_HW, 2) is not None
        assert probe.last_problem is None


def test_no_forward_and_batch_mismatch_warn():
    unet = make_unet()
    with AttentionEntropyProbe(unet, layers=["mid_block"], cfg_batched=False) as probe:
        with pytest.warns(RuntimeWarning, match="no denoiser forward"):
            assert probe.confidence(LATENT_HW, 2) is None
        assert probe.last_problem == "no denoiser forward ran since the last step"
        run(unet, unet_inputs(batch=2))
        with pytest.warns(RuntimeWarning, match="latent batch has 1"):
            assert probe.confidence(LATENT_HW, 1) is None
        assert probe.last_problem == "the probed layers saw 2 samples, the latent batch has 1"


def test_happy_path_emits_no_warning():
    model = make_flux()
    with AttentionEntropyProbe(model) as probe, warnings.catch_warnings():
        warnings.simplefilter("error")
        run(model, flux_inputs())
        assert probe.confidence(LATENT_HW, 1) is not None


# -- EMA, reset ----------------------------------------------------------------------------------------------------


def test_ema_over_steps_and_reset():
    unet = make_unet()
    with AttentionEntropyProbe(unet, layers=["*attn1"], ema=0.75) as probe:
        run(unet, unet_inputs(batch=1, seed=1))
        probe.confidence(LATENT_HW, 1)
        first = probe.last_entropy
        run(unet, unet_inputs(batch=1, seed=2))
        probe.confidence(LATENT_HW, 1)
        smoothed = probe.last_entropy
        probe.reset()
        run(unet, unet_inputs(batch=1, seed=2))
        probe.confidence(LATENT_HW, 1)
        second = probe.last_entropy  # after reset: no memory of the first step
    torch.testing.assert_close(smoothed, 0.75 * first + 0.25 * second)
    assert not torch.allclose(first, second)


# -- layer selection -----------------------------------------------------------------------------------------------


def test_default_layers_per_architecture():
    sd15_like = make_unet(sd15_layout=True)
    names = default_layer_names(sd15_like)
    assert names == [
        "mid_block.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn1",
    ]
    flux_names = default_layer_names(make_flux())
    assert any(n.startswith("transformer_blocks.") for n in flux_names)
    assert any(n.startswith("single_transformer_blocks.") for n in flux_names)
    for make in (make_sd3, make_dit, make_pixart):
        names = default_layer_names(make())
        assert names and all(n.startswith("transformer_blocks.") and not n.endswith("attn2") for n in names)


def test_layer_patterns():
    unet = make_unet()
    assert [layer.name for layer in select_layers(unet, ["mid_block"])] == [
        "mid_block.attentions.0.transformer_blocks.0.attn1"  # a container: its self-attention only
    ]
    assert len(select_layers(unet, ["*attn1"])) == 10
    with pytest.raises(ValueError, match="cross-attention"):
        select_layers(unet, ["*attn2"])
    with pytest.raises(ValueError, match="matches no"):
        select_layers(unet, ["no_such_block"])
    with pytest.raises(ValueError):
        AttentionEntropyProbe(unet, ema=1.0)


# -- benchmark function ----------------------------------------------------------------------------------------------


def test_bench_probe_runs_on_a_tiny_unet():
    from qsilk.attention.bench import bench_probe

    tiny = make_unet().config
    config = {
        key: tiny[key]
        for key in (
            "block_out_channels",
            "down_block_types",
            "up_block_types",
            "layers_per_block",
            "cross_attention_dim",
            "attention_head_dim",
            "norm_num_groups",
            "sample_size",
            "in_channels",
            "out_channels",
        )
    }
    figures = bench_probe(height=64, width=96, unet_config=config, repeats=2)
    assert figures["layers"] == default_layer_names(make_unet())
    assert figures["step_seconds"] > 0 and figures["probe_seconds"] > 0
    assert figures["probe_fraction"] == pytest.approx(figures["probe_seconds"] / figures["step_seconds"])
