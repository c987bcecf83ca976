"""qsilk.files: the one atomic writer every module uses (temp name + fsync + rename)."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from qsilk import files
from qsilk.cli.runs import TMP_FILE, clean_temp_files
from qsilk.files import atomic_save_tensors, atomic_write_bytes, atomic_write_text, temp_path


def test_writes_round_trip_create_parents_and_leave_only_the_target(tmp_path):
    atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "a" / "c.json", "é\n")
    tensors = {"x": torch.arange(6.0).reshape(2, 3).t(), "y": torch.tensor([1, 2], dtype=torch.uint8)}
    atomic_save_tensors(tensors, tmp_path / "a" / "d.safetensors", metadata={"seconds": "1.5"})

    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "a" / "c.json").read_bytes() == "é\n".encode()
    with safe_open(str(tmp_path / "a" / "d.safetensors"), "pt") as f:
        assert f.metadata() == {"seconds": "1.5"}
        assert torch.equal(f.get_tensor("x"), tensors["x"])  # a non-contiguous view is saved by value
        assert torch.equal(f.get_tensor("y"), tensors["y"])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin", "c.json", "d.safetensors"]


def test_every_write_is_flushed_to_disk_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic_write_bytes(tmp_path / "b.bin", b"data")
    atomic_save_tensors({"x": torch.ones(2)}, tmp_path / "t.safetensors")
    assert events == ["fsync", "replace", "fsync", "replace"]


@pytest.mark.parametrize("fail_in", ["_fsync", "rename"])
def test_a_failed_write_keeps_the_old_target_and_removes_the_temp_file(tmp_path, monkeypatch, fail_in):
    target = tmp_path / "results.json"
    target.write_text("old")

    def boom(*args):
        raise OSError("disk full")

    if fail_in == "rename":
        monkeypatch.setattr(os, "replace", boom)
    else:
        monkeypatch.setattr(files, "_fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new and longer")
    with pytest.raises(OSError, match="disk full"):
        atomic_save_tensors({"x": torch.ones(3)}, tmp_path / "t.safetensors")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_an_interrupt_halfway_through_saving_tensors_leaves_no_partial_file(tmp_path, monkeypatch):
    import safetensors.torch

    def half_then_ctrl_c(tensors, filename, metadata=None):
        data = safetensors.torch.save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        atomic_save_tensors({"x": torch.ones(100)}, tmp_path / "t.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_killed_writer_leaves_the_old_target_and_a_temp_file_the_cli_cleanup_removes(tmp_path):
    target = tmp_path / "image.png"
    target.write_bytes(b"old")
    # The child writes the new bytes, then dies (SIGKILL) between the write and the rename.
    child = (
        "import os, signal, sys\n"
        "from qsilk import files\n"
        "files._fsync = lambda path: os.kill(os.getpid(), signal.SIGKILL)\n"
        "files.atomic_write_bytes(files.Path(sys.argv[1]), b'new bytes')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", child, str(target)], stderr=subprocess.PIPE)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == -9, stderr.decode()
    assert target.read_bytes() == b"old"
    (leftover,) = [p for p in tmp_path.iterdir() if p != target]
    assert leftover.read_bytes() == b"new bytes"
    assert leftover.name == f".image.png.{proc.pid}.tmp" and _pid_in(leftover.name) == proc.pid

    assert clean_temp_files([tmp_path]) == [leftover]  # the writer is dead: its temp file goes
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]


def _pid_in(name: str) -> int:
    match = TMP_FILE.match(name)
    assert match and match.group(1), name
    return int(match.group(1))


def test_the_temp_name_carries_this_process_pid_in_the_form_the_cli_cleanup_recognises(tmp_path):
    tmp = temp_path(tmp_path / "x.maps.npz")
    assert tmp.parent == tmp_path and tmp.name.startswith(".x.maps.npz.")
    assert _pid_in(tmp.name) == os.getpid()
    tmp.write_bytes(b"")  # a live writer's (this process's own) leftovers are removed too
    assert clean_temp_files([tmp_path]) == [tmp]
