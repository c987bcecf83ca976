"""qsilk.eval.classifier: preprocessing, weights round-trip, training (fake Fashion-MNIST) and resume."""

import json

import pytest
import torch

from qsilk.eval import classifier as clf
from qsilk.eval.classifier import ClassifierConfig, FashionCNN, TrainConfig

TINY = {"widths": [4, 4, 8, 8], "num_classes": 10, "dropout": 0.1, "image_size": 64}


def _tiny_train(epochs=8, **kw):
    return TrainConfig(epochs=epochs, batch_size=16, lr=1e-2, max_shift=1, model=dict(TINY), **kw)


def test_prepare_matches_the_demo_models_image_path():
    """Real Fashion-MNIST (to_model_images, then [0, 1]) and a pipeline's RGB output reach the network alike."""
    from qsilk.models.demo.data import to_model_images

    model = FashionCNN(ClassifierConfig.from_dict(TINY)).eval()
    raw = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    as_model = to_model_images(raw.numpy()).add(1).mul(0.5)  # (3, 1, 64, 64) in [0, 1]
    rgb = as_model.repeat(1, 3, 1, 1)  # what QSilkDemoPipeline(output_type="pt") returns
    torch.testing.assert_close(model.prepare(rgb), as_model * 2 - 1)
    # 28x28 input is resized to 64x64 the same way the demo data path does it.
    torch.testing.assert_close(model.prepare(raw[:, None]), as_model * 2 - 1, atol=1e-6, rtol=0)
    with torch.no_grad():
        assert model.features(rgb).shape == (3, 8)
        assert model(rgb).shape == (3, 10)
    with pytest.raises(ValueError, match="expected"):
        model.prepare(torch.rand(2, 2, 64, 64))
    with pytest.raises(ValueError, match="at least one"):
        model.prepare(torch.rand(0, 1, 64, 64))


def test_config_validation_and_round_trip():
    cfg = ClassifierConfig.from_dict(json.loads(json.dumps(ClassifierConfig().to_dict())))
    assert cfg == ClassifierConfig()
    with pytest.raises(ValueError, match="widths"):
        ClassifierConfig(widths=(8, 8))
    with pytest.raises(ValueError, match="unknown"):
        ClassifierConfig.from_dict({"depth": 3})


def test_training_on_fake_data_learns(tmp_path):
    """The fake classes (rectangle height, tests/conftest.py) are learnable: a few epochs on 240 fake images put
    the held-out fake split far above chance (10 %)."""
    from conftest import write_idx

    root = tmp_path / "data"
    root.mkdir()
    write_idx(root, "train", 240, 0)
    write_idx(root, "test", 64, 1)
    config = TrainConfig(epochs=6, batch_size=16, lr=1e-2, max_shift=1, model=dict(TINY, widths=[8, 8, 16, 16]))
    logs = []
    _, meta = clf.train_classifier(tmp_path / "run", config, root=root, log=logs.append)
    first_loss, last_loss = (float(line.split("train loss ")[1].split(",")[0]) for line in (logs[0], logs[-1]))
    assert last_loss < first_loss - 0.3
    assert meta["test_accuracy"] >= 0.3 and meta["test_n"] == 64 and meta["train_n"] == 240


def test_training_saves_and_loads(tmp_path, fake_dataset):
    logs = []
    model, meta = clf.train_classifier(tmp_path, _tiny_train(epochs=2), root=fake_dataset, log=logs.append)
    assert len(logs) == 2 and "test acc" in logs[-1]
    assert meta["test_n"] == 16 and meta["train_n"] == 48 and 0 <= meta["test_accuracy"] <= 1
    assert meta["train"]["seed"] == 0 and meta["config"]["widths"] == TINY["widths"]
    loaded = clf.load_classifier(tmp_path)
    x = torch.rand(4, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert loaded.metadata["test_accuracy"] == meta["test_accuracy"]
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    with pytest.raises(FileNotFoundError, match="not found"):
        clf.load_classifier(tmp_path / "missing")
    # A second (fine-tuning) stage starts from the saved weights and records the first stage.
    stage2 = _tiny_train(epochs=1, init_from=str(tmp_path))
    tuned, meta2 = clf.train_classifier(tmp_path / "stage2", stage2, root=fake_dataset, log=lambda s: None)
    assert meta2["previous_stage"]["test_accuracy"] == meta["test_accuracy"]
    assert meta2["train"]["init_from"] == str(tmp_path)
    assert not torch.equal(tuned.head.weight, model.head.weight)


def test_training_resumes_after_an_interruption_with_identical_weights(tmp_path, fake_dataset):
    straight, _ = clf.train_classifier(tmp_path / "a", _tiny_train(epochs=3), root=fake_dataset, log=lambda s: None)

    def crash_after_first_epoch(line):
        if line.startswith("epoch 2/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        clf.train_classifier(tmp_path / "b", _tiny_train(epochs=3), root=fake_dataset, log=crash_after_first_epoch)
    assert not (tmp_path / "b" / "fmnist_cnn.safetensors").exists()
    logs = []
    resumed, _ = clf.train_classifier(tmp_path / "b", _tiny_train(epochs=3), root=fake_dataset, log=logs.append)
    assert logs[0] == "resuming after epoch 2" and len(logs) == 2
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_shipped_classifier_record():
    """The shipped weights load, are small, and their JSON reports >= 90 % test accuracy and how they were made."""
    files = [clf.ASSET_DIR / f"{clf.ASSET_NAME}.{ext}" for ext in ("safetensors", "json")]
    if not all(f.is_file() for f in files):
        pytest.skip("shipped classifier not present")
    assert files[0].stat().st_size <= 1_100_000
    model = clf.load_fmnist_classifier()
    meta = model.metadata
    assert meta["test_accuracy"] >= 0.90 and meta["test_n"] == 10_000 and meta["train_n"] == 60_000
    for key in ("train_seconds", "train", "config", "purpose", "parameters"):
        assert key in meta
    assert "seed" in meta["train"]
    assert meta["parameters"] == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert model.features(torch.rand(2, 3, 64, 64)).shape == (2, model.num_features)


@pytest.mark.slow
def test_shipped_classifier_accuracy_on_the_real_test_split():
    from qsilk.models.demo.data import FASHION_MNIST_DIR

    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed")
    model = clf.load_fmnist_classifier()
    images, labels = clf.fmnist_tensors("test")
    accuracy = clf.evaluate(model, images, labels)
    assert accuracy >= 0.90
    assert accuracy == pytest.approx(model.metadata["test_accuracy"], abs=1e-4)
