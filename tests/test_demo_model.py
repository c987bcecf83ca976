"""The demo model's code path end to end on a tiny fake Fashion-MNIST: AE training, latent cache, DiT training with
resume, export to a diffusers folder, loading and deterministic sampling. Plus the DiT fixes (label dropout,
adaLN-Zero)."""

import json

import numpy as np
import pytest
import torch

from qsilk.models.demo import data as demo_data
from qsilk.models.demo import load_demo_pipeline
from qsilk.models.demo.dit import build_dit, drop_labels, null_class_id
from qsilk.models.demo.pipeline import QSilkDemoPipeline


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fake_dataset):
    from qsilk.models.demo import export, train_ae, train_dit

    mp = pytest.MonkeyPatch()
    mp.setattr(demo_data, "FASHION_MNIST_DIR", fake_dataset)
    run = tmp_path_factory.mktemp("run")
    try:
        train_ae.main(
            [
                "--run-dir",
                str(run / "ae"),
                "--preset",
                "tiny",
                "--steps",
                "3",
                "--batch-size",
                "4",
                "--eval-images",
                "8",
                "--encode-batch",
                "16",
                "--warmup",
                "1",
            ]
        )
        common = [
            "--run-dir",
            str(run / "dit"),
            "--ae-dir",
            str(run / "ae"),
            "--preset",
            "tiny",
            "--batch-size",
            "4",
            "--log-every",
            "1",
            "--warmup",
            "1",
        ]
        train_dit.main([*common, "--max-steps", "2"])
        train_dit.main([*common, "--max-steps", "4"])  # resumes from step 2
        export.main(
            [
                "--ae-dir",
                str(run / "ae"),
                "--dit-dir",
                str(run / "dit"),
                "--out",
                str(run / "export"),
                "--grid",
                str(run / "grid.png"),
                "--grid-steps",
                "2",
                "--loss-plot",
                str(run / "loss.png"),
            ]
        )
    finally:
        mp.undo()
    return run


def test_idx_reader_and_model_images(fake_dataset):
    images, labels = demo_data.load_fashion_mnist("train", fake_dataset)
    assert images.shape == (48, 28, 28) and labels.shape == (48,)
    x = demo_data.to_model_images(images[:3])
    assert x.shape == (3, 1, 64, 64) and float(x.min()) >= -1 and float(x.max()) <= 1


def test_training_resumes_and_exports_a_loadable_pipeline(trained):
    log = [json.loads(line) for line in (trained / "dit" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # the second run continued, it did not restart
    metrics = json.loads((trained / "ae" / "metrics.json").read_text())
    assert metrics["latent_shape"] == [4, 16, 16]
    info = json.loads((trained / "export" / "export.json").read_text())
    assert info["dit_step"] == 4
    assert (trained / "grid.png").exists() and (trained / "loss.png").exists()
    weights = list((trained / "export").rglob("*.safetensors"))
    assert weights and not list((trained / "export").rglob("*.bin"))
    pipe = load_demo_pipeline(path=trained / "export", scheduler="ddim")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.null_class_id == 10 and pipe.get_label_ids("Dress") == [3]
    out1 = pipe(
        ["Dress", 7], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    )
    out2 = pipe(
        ["Dress", 7], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    )
    assert out1.images.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(out1.images, out2.images)


def test_missing_demo_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no demo model"):
        load_demo_pipeline(path=tmp_path)


def test_dit_fixes_label_dropout_once_per_sample_and_adaln_zero():
    model = build_dit(num_classes=10, preset="tiny")
    assert null_class_id(model) == 10
    model.train()
    # adaLN-Zero: a fresh model predicts exactly zero
    x = torch.randn(2, 4, 16, 16)
    out = model(x, timestep=torch.tensor([10, 500]), class_labels=torch.tensor([1, 2])).sample
    assert torch.equal(out, torch.zeros_like(out))
    # label dropout is one draw per sample, never per block
    labels = torch.arange(1000) % 10
    dropped = drop_labels(labels, 0.1, 10, generator=torch.Generator().manual_seed(0))
    assert 50 < int((dropped == 10).sum()) < 150
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])
    blocks = [m for m in model.modules() if type(m).__name__ == "LabelEmbedding"]
    assert blocks and all(m.dropout_prob == 0.0 for m in blocks)


def test_pipeline_rejects_bad_classes(trained):
    pipe = QSilkDemoPipeline.from_pretrained(trained / "export")
    with pytest.raises(ValueError, match="unknown class"):
        pipe(["Spaceship"], num_inference_steps=1)
    with pytest.raises(ValueError, match="out of range"):
        pipe([42], num_inference_steps=1)


def test_missing_dataset_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        demo_data.load_fashion_mnist("train", tmp_path)


def test_training_continues_from_an_exported_folder(trained, tmp_path):
    from qsilk.models.demo import train_dit

    run = tmp_path / "dit2"
    train_dit.main(
        ["--run-dir", str(run), "--ae-dir", str(trained / "ae"), "--preset", "tiny", "--batch-size", "4",
         "--log-every", "1", "--warmup", "1", "--init-from", str(trained / "export"), "--max-steps", "5"]
    )
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5]  # continued from the exported step 4
    shipped = QSilkDemoPipeline.from_pretrained(trained / "export").transformer.state_dict()
    from qsilk.models.demo.checkpoint import latest_checkpoint, load_checkpoint

    tensors, state = load_checkpoint(latest_checkpoint(run))
    assert state["step"] == 5
    moved = [k for k in shipped if not torch.equal(tensors["model"][k].float(), shipped[k].float())]
    assert moved  # it trained on top of the shipped weights
