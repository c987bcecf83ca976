"""QRM injection: zero delta is bit-identical, detach restores, chunk layouts move exactly the right quantity,
baselines equal what the model computes, the CFG row choice and the window, config/checkpoint round trips."""

from __future__ import annotations

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from qsilk.qrm import QRM, QRMConfig, attach, attached, detach, discover_heads, load_qrm, save_qrm
from qsilk.qrm.heads import CONTINUOUS2, DIT_OUT2, SINGLE3, ZERO6, ZERO9, UnsupportedBackboneError
from tiny_pipelines import run as run_pipe
from tiny_pipelines import tiny_dit_pipeline, tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline


def tiny_sd35_pipeline():
    """SD3 with SD3.5 dual-attention blocks (SD35AdaLayerNormZeroX, 9 chunks) in both layers."""
    from diffusers import SD3Transformer2DModel

    pipe = tiny_sd3_pipeline()
    torch.manual_seed(0)
    config = dict(pipe.transformer.config)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config["dual_attention_layers"] = (0,)
    pipe.transformer = SD3Transformer2DModel(**config).eval()
    return pipe


PIPES = {
    "dit": tiny_dit_pipeline,
    "pixart": tiny_pixart_pipeline,
    "sd3": tiny_sd3_pipeline,
    "sd35": tiny_sd35_pipeline,
    "flux": tiny_flux_pipeline,
}


@pytest.fixture(scope="module", params=sorted(PIPES))
def pipe(request):
    return PIPES[request.param]()


def run(pipe, seed=0, steps=2):
    return run_pipe(pipe, steps=steps, seed=seed)


def randomise(qrm: QRM, scale: float = 0.05, seed: int = 1) -> QRM:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in qrm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return qrm


@pytest.mark.parametrize("kind", ["light", "faithful"])
def test_zero_delta_bit_identical_and_detach_restores(pipe, kind):
    base = run(pipe)
    qrm = QRM(QRMConfig.for_transformer(pipe.transformer, kind, xt_pool=2))
    with attach(pipe, qrm) as handle:
        same = run(pipe)
        assert handle.active_calls == handle.calls > 0
        assert all(float(d.abs().max()) == 0.0 for d in handle.last_deltas)
    assert torch.equal(same, base)
    randomise(qrm)
    attach(pipe, qrm)
    moved = run(pipe)
    detach(pipe)
    assert attached(pipe) is None
    assert not torch.equal(moved, base)
    assert torch.equal(run(pipe), base)
    assert not pipe.transformer._forward_hooks and not pipe.transformer._forward_pre_hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in pipe.transformer.modules())
    assert all("forward" not in m.__dict__ for m in pipe.transformer.modules())  # swapped forwards are gone


def test_backbone_reads_no_weight_more_often_than_without_qrm(pipe, monkeypatch):
    """QRM computes every head's baseline (and DiT's embedders) before the first block; the model's own calls get
    those results back, so no backbone linear runs more often than without QRM, and the images are bit-identical
    to recomputing them."""
    from qsilk.qrm.hooks import QRMHandle

    if isinstance(pipe.transformer, PixArtTransformer2DModel):
        pytest.skip("PixArt's heads are block inputs, not linears: nothing is recomputed")
    qrm = randomise(QRM(QRMConfig.for_transformer(pipe.transformer, "light")))
    with monkeypatch.context() as m:
        m.setattr(QRMHandle, "_swap_forward", lambda self, module: None)
        with attach(pipe, qrm):
            recomputed = run(pipe)
    calls: dict[int, int] = {}
    original = torch.nn.Linear.forward

    def counting(self, input):
        calls[id(self)] = calls.get(id(self), 0) + 1
        return original(self, input)

    monkeypatch.setattr(torch.nn.Linear, "forward", counting)
    run(pipe)
    plain_calls = {id(m): calls.get(id(m), 0) for m in pipe.transformer.modules()}
    calls.clear()
    with attach(pipe, qrm):
        reused = run(pipe)
    # (DiT's final layer re-runs block 0's embedder; with QRM that one comes from the pre-hook too: fewer calls)
    assert all(calls.get(key, 0) <= n for key, n in plain_calls.items())
    assert sum(plain_calls.values()) > 0
    assert torch.equal(reused, recomputed)


def test_head_layouts():
    dit = discover_heads(tiny_dit_pipeline().transformer)
    assert [h.roles for h in dit] == [ZERO6, ZERO6, DIT_OUT2]
    sd3 = {h.name: h.roles for h in discover_heads(tiny_sd3_pipeline().transformer)}
    assert sd3["transformer_blocks.0.norm1.linear"] == ZERO6
    assert sd3["transformer_blocks.1.norm1_context.linear"] == CONTINUOUS2  # last block: context_pre_only
    assert sd3["norm_out.linear"] == CONTINUOUS2
    sd35 = {h.name: h.roles for h in discover_heads(tiny_sd35_pipeline().transformer)}
    assert sd35["transformer_blocks.0.norm1.linear"] == ZERO9
    assert sd35["transformer_blocks.1.norm1.linear"] == ZERO6
    flux = {h.name: h.roles for h in discover_heads(tiny_flux_pipeline().transformer)}
    assert flux["single_transformer_blocks.0.norm.linear"] == SINGLE3
    assert flux["transformer_blocks.0.norm1_context.linear"] == ZERO6
    assert flux["norm_out.linear"] == CONTINUOUS2
    pixart = discover_heads(tiny_pixart_pipeline().transformer)
    assert [h.name for h in pixart] == ["transformer_blocks.0", "transformer_blocks.1"]
    with pytest.raises(UnsupportedBackboneError, match="UNet"):
        discover_heads(torch.nn.Linear(2, 2))


def test_baselines_equal_what_the_model_computes(pipe):
    """The baseline vectors QRM sees are the heads' real outputs (captured independently by our own hooks)."""
    transformer = pipe.transformer
    qrm = QRM(QRMConfig.for_transformer(transformer, "light"))
    seen: dict[str, list] = {}
    captured: dict[str, list] = {}
    hooks = []
    for head in qrm.config.heads:
        module = transformer.get_submodule(head.name)
        if head.name.startswith("transformer_blocks.") and head.name.count(".") == 1:  # PixArt block input

            def pre(mod, args, kwargs, name=head.name):
                table = mod.scale_shift_table
                t = kwargs["timestep"]
                captured.setdefault(name, []).append(
                    (table[None] + t.reshape(t.shape[0], 6, -1)).reshape(t.shape[0], -1)
                )

            hooks.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            hooks.append(
                module.register_forward_hook(
                    lambda m, a, out, name=head.name: captured.setdefault(name, []).append(out)
                )
            )
    original_forward = qrm.forward

    def spy(timestep, cond, baselines, xt=None):
        for head, b in zip(qrm.config.heads, baselines, strict=True):
            seen.setdefault(head.name, []).append(b.detach().clone())
        return original_forward(timestep, cond, baselines, xt)

    qrm.forward = spy
    with attach(pipe, qrm):
        run(pipe)
    for h in hooks:
        h.remove()
    assert set(seen) == set(captured)
    for name in seen:
        # adaLN linears are called twice per transformer call: by QRM for the baseline, then by the model
        model_calls = (
            captured[name] if isinstance(pipe.transformer, PixArtTransformer2DModel) else captured[name][1::2]
        )
        assert len(seen[name]) == len(model_calls) > 0
        for a, b in zip(seen[name], model_calls, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _set_chunk_delta(qrm: QRM, head_name: str, role_index: int, value: float) -> None:
    """Make the light QRM's delta a constant on one chunk of one head (via its per-head constant)."""
    k = [h.name for h in qrm.config.heads].index(head_name)
    head = qrm.config.heads[k]
    with torch.no_grad():
        qrm.head_bias[k].zero_()
        qrm.head_bias[k][head.chunk_slice(role_index)] = value


def _capture(module, fn):
    out = []
    h = module.register_forward_hook(lambda m, a, o: out.append(o))
    try:
        fn()
    finally:
        h.remove()
    return out


def test_continuous_head_scale_before_shift():
    """diffusers' 2-chunk AdaLayerNormContinuous is (scale, shift): a delta on chunk 1 shifts the output by exactly
    that constant; on chunk 0 it scales the normalised input."""
    pipe = tiny_sd3_pipeline()
    norm_out = pipe.transformer.norm_out
    inputs = []
    h = norm_out.register_forward_hook(lambda m, a, o: inputs.append(a[0]))
    base = _capture(norm_out, lambda: run(pipe, steps=1))
    h.remove()
    qrm = QRM(QRMConfig.for_transformer(pipe.transformer, "light", apply_to_uncond=True))
    _set_chunk_delta(qrm, "norm_out.linear", CONTINUOUS2.index("shift"), 0.25)
    with attach(pipe, qrm):
        shifted = _capture(norm_out, lambda: run(pipe, steps=1))
    torch.testing.assert_close(shifted[0] - base[0], torch.full_like(base[0], 0.25), rtol=0, atol=1e-5)
    _set_chunk_delta(qrm, "norm_out.linear", CONTINUOUS2.index("scale"), 0.25)
    with attach(pipe, qrm):
        scaled = _capture(norm_out, lambda: run(pipe, steps=1))
    normed = norm_out.norm(inputs[0])
    torch.testing.assert_close(scaled[0] - base[0], 0.25 * normed, rtol=1e-4, atol=1e-5)


def test_zero_head_chunks_move_shift_scale_gate():
    """AdaLayerNormZero returns (x, gate_msa, shift_mlp, scale_mlp, gate_mlp): a delta on one chunk changes exactly
    that returned quantity (or, for shift_msa/scale_msa, x by the constant / by c * LN(x))."""
    pipe = tiny_flux_pipeline()
    norm = pipe.transformer.transformer_blocks[0].norm1
    name = "transformer_blocks.0.norm1.linear"
    inputs = []
    h = norm.register_forward_hook(lambda m, a, o: inputs.append(a[0]))
    base = _capture(norm, lambda: run(pipe, steps=1))[0]
    h.remove()
    qrm = QRM(QRMConfig.for_transformer(pipe.transformer, "light"))
    # returned tuple index for each chunk that is returned as is
    returned = {2: 1, 3: 2, 4: 3, 5: 4}  # gate_msa, shift_mlp, scale_mlp, gate_mlp
    for chunk in range(6):
        _set_chunk_delta(qrm, name, chunk, 0.5)
        with attach(pipe, qrm):
            out = _capture(norm, lambda: run(pipe, steps=1))[0]
        for j in range(5):
            expected_change = chunk in returned and returned[chunk] == j
            if j == 0:
                expected_change = chunk in (0, 1)
            diff = out[j] - base[j]
            if not expected_change:
                assert torch.equal(out[j], base[j]), (chunk, j)
            elif j == 0 and chunk == 0:  # shift_msa
                torch.testing.assert_close(diff, torch.full_like(diff, 0.5), rtol=0, atol=1e-5)
            elif j == 0 and chunk == 1:  # scale_msa
                torch.testing.assert_close(diff, 0.5 * norm.norm(inputs[0]), rtol=1e-4, atol=1e-5)
            else:
                torch.testing.assert_close(diff, torch.full_like(diff, 0.5), rtol=0, atol=1e-6)


def test_dit_output_head_is_shift_then_scale():
    """DiT's proj_out_1 is (shift, scale): a delta on chunk 0 moves the input of proj_out_2 by the constant."""
    pipe = tiny_dit_pipeline()
    proj = pipe.transformer.proj_out_2
    grab = lambda: [a for a in _capture_inputs(proj, lambda: run(pipe, steps=1))]  # noqa: E731
    base = grab()
    qrm = QRM(QRMConfig.for_transformer(pipe.transformer, "light", apply_to_uncond=True))
    _set_chunk_delta(qrm, "proj_out_1", DIT_OUT2.index("shift"), 0.125)
    with attach(pipe, qrm):
        moved = grab()
    torch.testing.assert_close(moved[0] - base[0], torch.full_like(base[0], 0.125), rtol=0, atol=1e-5)


def _capture_inputs(module, fn):
    out = []
    h = module.register_forward_hook(lambda m, a, o: out.append(a[0]))
    try:
        fn()
    finally:
        h.remove()
    return out


@pytest.mark.parametrize("name", ["dit", "sd3", "pixart"])
def test_uncond_rows_get_no_delta_unless_asked(name):
    pipe = PIPES[name]()
    qrm = randomise(QRM(QRMConfig.for_transformer(pipe.transformer, "light")))
    module = pipe.transformer.get_submodule(qrm.config.heads[0].name)

    def modulation():
        """The first head's modulation vector as the model uses it (PixArt: the block's timestep input, read by
        a pre-hook registered after QRM's, so it sees the delta)."""
        seen = []
        if name == "pixart":
            h = module.register_forward_pre_hook(lambda m, a, k: seen.append(k["timestep"]), with_kwargs=True)
        else:
            h = module.register_forward_hook(lambda m, a, o: seen.append(o))
        run(pipe, steps=2)  # PixArt's pipeline cannot take 1 step
        h.remove()
        return seen[-1]  # the model's own call (QRM computes the baseline first)

    base = modulation()
    half = base.shape[0] // 2
    # DiTPipeline batches CFG as [cond, uncond] (found by the null label); SD3 and PixArt as [uncond, cond]
    uncond, cond = (
        (slice(half, None), slice(0, half)) if name == "dit" else (slice(0, half), slice(half, None))
    )
    with attach(pipe, qrm):
        moved = modulation()
    assert torch.equal(moved[uncond], base[uncond])
    assert not torch.equal(moved[cond], base[cond])
    with attach(pipe, qrm, apply_to_uncond=True):
        both = modulation()
    assert not torch.equal(both[uncond], base[uncond])


def test_window_limits_active_steps():
    pipe = tiny_dit_pipeline()
    qrm = randomise(QRM(QRMConfig.for_transformer(pipe.transformer, "light")))
    with attach(pipe, qrm, window=(0.0, 0.4)) as handle:
        run(pipe, steps=5)
        assert handle.calls == 5 and handle.active_calls == 2  # progress 0, 0.25 of 0..1
    with attach(pipe, qrm, window=(0.0, 0.0)) as handle:
        first_only = run(pipe, steps=3)
    base = run(pipe, steps=3)
    assert not torch.equal(first_only, base)
    with attach(pipe.transformer, qrm, window=(0.5, 1.0)), pytest.warns(UserWarning, match="window cannot"):
        run(pipe, steps=1)


def test_config_json_round_trip_and_validation():
    transformer = tiny_sd3_pipeline().transformer
    for kind in ("light", "faithful"):
        config = QRMConfig.for_transformer(transformer, kind)
        assert QRMConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="kind"):
        QRMConfig(kind="huge")
    with pytest.raises(ValueError, match="window"):
        QRMConfig(window=(0.6, 0.2))
    with pytest.raises(ValueError, match="unknown keys"):
        QRMConfig.from_dict({"wdith": 3})


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    pipe = tiny_dit_pipeline()
    qrm = randomise(QRM(QRMConfig.for_transformer(pipe.transformer, "light")))
    save_qrm(qrm, tmp_path / "q", metadata={"note": "test"})
    loaded = load_qrm(tmp_path / "q.safetensors", pipe.transformer)
    for (k, a), (k2, b) in zip(qrm.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    with attach(pipe, qrm):
        first = run(pipe)
    with attach(pipe, loaded):
        assert torch.equal(run(pipe), first)
    other = tiny_sd3_pipeline().transformer
    with pytest.raises(ValueError, match="trained for a DiTTransformer2DModel, not a SD3Transformer2DModel"):
        load_qrm(tmp_path / "q", other)
    from diffusers import DiTTransformer2DModel

    config = {k: v for k, v in dict(pipe.transformer.config).items() if not k.startswith("_")}
    config["num_layers"] = 3
    with pytest.raises(ValueError, match="config hash"):
        load_qrm(tmp_path / "q", DiTTransformer2DModel(**config))
    with pytest.raises(ValueError, match="config hash"):
        attach(DiTTransformer2DModel(**config), loaded)
    with pytest.raises(RuntimeError, match="already attached"), attach(pipe, qrm):
        attach(pipe, qrm)
    assert attached(pipe) is None


def test_light_module_matches_a_per_head_loop():
    """The batched light paths equal a plain per-head, per-chunk computation written out here."""
    import torch.nn.functional as F

    transformer = tiny_sd35_pipeline().transformer
    qrm = randomise(QRM(QRMConfig.for_transformer(transformer, "light", xt_pool=2)), scale=0.1)
    g = torch.Generator().manual_seed(0)
    heads = qrm.config.heads
    baselines = [torch.randn(3, h.width, generator=g) for h in heads]
    t = torch.rand(3, generator=g)
    cond = torch.randn(3, qrm.config.cond_dim, generator=g)
    xt = torch.randn(3, qrm.config.xt_channels, 8, 8, generator=g)
    deltas = qrm(t, cond, baselines, xt)

    def basis(kind, role, dim):
        return getattr(qrm, kind)[f"{role}_{dim}"].weight

    tokens = []
    for k, (h, m) in enumerate(zip(heads, baselines, strict=True)):
        chunks = [F.layer_norm(m[:, j * h.dim : (j + 1) * h.dim], (h.dim,)) for j in range(len(h.roles))]
        coeffs = torch.cat(
            [c @ basis("basis_in", r, h.dim).T for c, r in zip(chunks, h.roles, strict=True)], 1
        )
        tokens.append(qrm.token_in[f"{'-'.join(h.roles)}_{h.dim}"](coeffs) + qrm.head_pos[k])
    x = torch.cat([torch.stack(tokens, 1), qrm._context_tokens(t, cond, xt)], 1)
    for block in qrm.blocks:
        x = block(x)
    x = qrm.norm_out(x[:, : len(heads)])
    for k, h in enumerate(heads):
        coeffs = qrm.coef_out[k](x[:, k])
        parts = [
            coeffs[:, j * qrm.config.rank : (j + 1) * qrm.config.rank] @ basis("basis_out", r, h.dim).T
            for j, r in enumerate(h.roles)
        ]
        torch.testing.assert_close(deltas[k], torch.cat(parts, 1) + qrm.head_bias[k], rtol=1e-5, atol=1e-6)


def test_parameter_budget_on_the_demo_model_shape():
    """The light configuration stays within 2 % of a DiT backbone of the demo model's shape."""
    from diffusers import DiTTransformer2DModel

    transformer = DiTTransformer2DModel(
        num_attention_heads=3,
        attention_head_dim=64,
        in_channels=4,
        out_channels=4,
        num_layers=6,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=32,
    )
    light = QRM(QRMConfig.for_transformer(transformer, "light"))
    backbone = sum(p.numel() for p in transformer.parameters())
    assert light.num_parameters() <= 0.02 * backbone
