"""python -m qsilk.qrm.bench: side-by-side step times with and without QRM (shipped demo model, 1 repeat)."""

import json

import torch

torch.set_num_threads(1)


def test_bench_reports_both_kinds_side_by_side(tmp_path, capsys):
    from qsilk.qrm.bench import main

    out = tmp_path / "bench.json"
    assert main(["--model", "demo", "--repeats", "2", "--json", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    assert printed["repeats"] == 2 and printed["cfg_batch"] == 2
    for kind in ("light", "faithful"):
        row = printed[kind]
        assert row["params"] > 0 and row["params_percent"] == 100 * row["params"] / printed["backbone_params"]
        assert abs(row["overhead_ms"] - (row["step_ms"] - printed["plain_step_ms"])) < 1e-9
        expected = 100 * (row["step_ms_min"] - printed["plain_step_ms_min"]) / printed["plain_step_ms_min"]
        assert abs(row["overhead_percent_min"] - expected) < 1e-9
        assert row["step_cpu_ms"] > 0
        assert row["qrm_work_ms"] > 0
        assert abs(row["qrm_work_percent"] - 100 * row["qrm_work_ms"] / printed["plain_step_ms"]) < 1e-9
        assert row["qrm_saved_ms"] > 0 and abs(row["qrm_net_ms"] - (row["qrm_work_ms"] - row["qrm_saved_ms"])) < 1e-9
        expected_cpu = 100 * (row["step_cpu_ms"] / printed["plain_step_cpu_ms"] - 1)
        assert abs(row["overhead_percent_cpu"] - expected_cpu) < 1e-6
    assert printed["light"]["params"] < printed["faithful"]["params"]
