"""QRM training on a tiny demo-style pipeline: it learns (reward goes up), a run killed mid-way resumes from its
last checkpoint to bit-for-bit the QRM of an uninterrupted run, and the rewards behave."""

from __future__ import annotations

import json

import pytest
import torch

from qsilk.qrm import QRMConfig, attach, load_qrm
from qsilk.qrm.rewards import ClassifierReward, CLIPReward, FashionMLP, load_mlp, save_mlp, x0_penalty
from qsilk.qrm.train import TrainConfig, lr_at, train_qrm, window_steps, x0_from_output
from tiny_pipelines import make_scheduler, tiny_dit_transformer, tiny_vae


def tiny_demo_pipeline():
    from qsilk.models.demo import QSilkDemoPipeline

    transformer = tiny_dit_transformer(out_channels=4, sample_size=8, num_embeds_ada_norm=10)
    vae = tiny_vae(blocks=(8, 8), in_channels=1, out_channels=1, sample_size=16)  # 16 px grey <-> 8x8 latent
    pipe = QSilkDemoPipeline(
        transformer, vae, make_scheduler("dpmpp", "v_prediction"), {i: f"c{i}" for i in range(10)}
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_reward():
    torch.manual_seed(3)
    return ClassifierReward(FashionMLP())


CONFIG = dict(batch_size=2, num_inference_steps=3, checkpoint_every=2, lr=3e-3, warmup=1, seed=5)


def train_small(pipe, out, config, reward, **extra):
    """train_qrm of a small light QRM, no progress bar."""
    qrm_config = QRMConfig.for_transformer(pipe.transformer, "light", width=16, num_heads=2, depth=1, rank=4)
    return train_qrm(pipe, out, config, reward=reward, qrm_config=qrm_config, progress_bar=False, **extra)


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    pipe = tiny_demo_pipeline()
    reward = tiny_reward()
    config = TrainConfig(steps=5, **CONFIG)
    full = train_small(pipe, tmp_path / "full", config, reward)

    class Killed(Exception):
        pass

    def kill_at_3(step, record):
        if step == 3:  # after the step-2 checkpoint, before the step-4 one: step 3's work is lost
            raise Killed

    with pytest.raises(Killed):
        train_small(pipe, tmp_path / "resumed", config, reward, on_step=kill_at_3)
    assert json.loads((tmp_path / "resumed" / "checkpoint.json").read_text())["step"] == 2
    resumed = train_small(pipe, tmp_path / "resumed", config, reward)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert any(float(p.abs().max()) > 0 for p in full.basis_out.parameters())  # it trained
    logs = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    full_logs = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == list(range(5))
    assert [r["loss"] for r in logs] == [r["loss"] for r in full_logs]
    # the exported QRM loads against the backbone and attaches
    loaded = load_qrm(tmp_path / "full" / "qrm", pipe.transformer)
    with attach(pipe, loaded):
        pipe([1, 2], num_inference_steps=2, output_type="latent")
    with pytest.raises(ValueError, match="different training config"):
        train_small(pipe, tmp_path / "full", TrainConfig(steps=6, **dict(CONFIG, lr=1e-2)), reward)


def test_training_raises_the_reward(tmp_path):
    """With a reward the tiny model can clearly move (mean brightness of the decoded image) and no penalty, the
    reward gain over the frozen model's own prediction grows from exactly 0."""
    pipe = tiny_demo_pipeline()
    config = TrainConfig(
        steps=10,
        batch_size=4,
        num_inference_steps=2,
        lr=2e-2,
        warmup=1,
        reg_weight=0.0,
        checkpoint_every=100,
        window=(1.0, 1.0),
    )
    brightness = lambda images, labels: images.mean(dim=(1, 2, 3))  # noqa: E731
    train_small(pipe, tmp_path, config, brightness)
    gains = [
        json.loads(line)["reward_gain"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert gains[0] == 0.0  # zero-initialised output: the first step is the base model
    assert min(gains[-3:]) > 2 * max(abs(g) for g in gains[:2])
    assert min(gains[-3:]) > 0


def test_helpers():
    assert window_steps((0.0, 1.0), 4) == [0, 1, 2, 3]
    assert window_steps((0.5, 1.0), 5) == [2, 3, 4]
    with pytest.raises(ValueError, match="contains none"):
        window_steps((0.3, 0.4), 2)
    config = TrainConfig(steps=100, warmup=10, lr=1.0)
    assert lr_at(0, config) == pytest.approx(0.1) and lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(99, config) == pytest.approx(0.1, abs=1e-3)
    with pytest.raises(ValueError, match="cfg_min"):
        TrainConfig(cfg_min=5, cfg_max=1)
    sched = make_scheduler("ddim", "v_prediction")
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor(500)
    a = sched.alphas_cumprod[500]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(x0_from_output(sched, v, x_t, t), x0, atol=1e-5, rtol=1e-5)
    assert float(x0_penalty(x0, x0).abs().max()) == 0.0


def test_classifier_reward_is_log_prob_and_round_trips(tmp_path):
    reward = tiny_reward()
    images = torch.rand(3, 1, 64, 64) * 2 - 1
    labels = torch.tensor([0, 4, 9])
    logits = reward.classifier(images)
    expected = torch.log_softmax(logits, 1)[torch.arange(3), labels]
    torch.testing.assert_close(reward(images, labels), expected)
    assert torch.equal(reward(images.repeat(1, 3, 1, 1), labels), reward(images, labels))  # grey RGB == grey
    images.requires_grad_(True)
    reward(images, labels).sum().backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0
    save_mlp(reward.classifier, tmp_path, {"note": "test"})
    loaded = load_mlp(tmp_path)
    torch.testing.assert_close(
        loaded(images.detach()), reward.classifier(images.detach()), atol=2e-2, rtol=1e-2
    )
    with pytest.raises(FileNotFoundError, match="train it"):
        load_mlp(tmp_path / "none")


def test_clip_reward_with_random_local_weights(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from tiny_pipelines import clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=128,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            max_position_embeddings=16,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    clip_tokenizer().save_pretrained(tmp_path / "clip")
    reward = CLIPReward(tmp_path / "clip")
    images = (torch.rand(2, 3, 48, 48) * 2 - 1).requires_grad_(True)
    scores = reward(images, ["a cat", "a dog"])
    assert scores.shape == (2,) and bool(((scores >= -1) & (scores <= 1)).all())
    scores.sum().backward()
    assert float(images.grad.abs().sum()) > 0
    # the same score computed independently from the model's own embeddings
    with torch.no_grad():
        img = reward.image_features(images)
        txt = reward.text_features(["a cat", "a dog"], images.device)
    torch.testing.assert_close(scores.detach(), (img * txt).sum(-1))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        CLIPReward("openai/clip-vit-base-patch32")  # offline: a hub id is refused, never fetched


def test_cli_train_qrm_bad_input_is_one_error_line(capsys, tmp_path):
    from qsilk.cli import main

    code = main(["train-qrm", "--out", str(tmp_path / "run"), "--cfg-min", "5", "--cfg-max", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: invalid TrainConfig: need 0 <= cfg_min <= cfg_max"]
    assert not (tmp_path / "run").exists()
