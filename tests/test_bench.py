"""bench/: the harness's helpers, and one tiny CPU run of each benchmark with its record and table checked."""
from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO, child_env


@pytest.fixture(scope="module")
def bench():
    """bench/'s scripts as modules (bench/ is not a package: the scripts import harness by name, as
    ``python bench/<script>.py`` lets them)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        return {name: importlib.import_module(name) for name in ("harness", "sampling", "training", "ddp")}
    finally:
        sys.path.remove(str(REPO / "bench"))


# ----------------------------------------------------------------------------- harness


def test_timed_drains_each_call_and_rejects_no_repeats(bench):
    calls = []
    seconds = bench["harness"].timed(lambda: calls.append(1), "cpu", 3)
    assert len(seconds) == 3 and len(calls) == 3 and all(s >= 0 for s in seconds)
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        bench["harness"].timed(lambda: None, "cpu", 0)


def test_format_table_formats_cells_marks_missing_and_keeps_pipes_inside(bench):
    table = bench["harness"].format_table([dict(name="a", rate=1.234, d=None), dict(name="b", rate=10.0)],
                                          [("name", "name", ""), ("rate", "images/s", ".1f"), ("d", "mean |d|", ".2f")])
    assert table.splitlines() == ["| name | images/s | mean \\|d\\| |", "| --- | --- | --- |", "| a | 1.2 | - |",
                                  "| b | 10.0 | - |"]


def test_add_ratios_divides_by_the_baseline_row(bench):
    add_ratios = bench["harness"].add_ratios
    rows = [dict(rate=100.0), dict(rate=250.0), dict(rate=None)]
    add_ratios(rows, "rate")
    assert [r["ratio"] for r in rows] == [1.0, 2.5, None]
    add_ratios(rows, "rate", baseline_row=1, out="vs_second")
    assert [r["vs_second"] for r in rows] == [0.4, 1.0, None]
    alone = [dict(world=2, rate=190.0)]  # no baseline measured (ddp.py --world 2): no ratio rather than a guess
    add_ratios(alone, "rate", baseline_row=None)
    assert alone[0]["ratio"] is None


def test_device_info_and_json_record_on_a_cpu(bench, tmp_path):
    harness = bench["harness"]
    info = harness.device_info("cpu")
    assert info["gpu"] is None and info["threads"] >= 1 and info["torch"] == torch.__version__
    assert harness.peak_memory_gib("cpu") is None
    harness.write_json(dict(a=1, device=torch.device("cpu")), tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1, "device": "cpu"}
    harness.write_json({"a": 1}, None)  # no path: nothing written, no error
    assert harness.command_line("sampling.py", ["--tiny"]) == "python bench/sampling.py --tiny"


def test_step_timer_counts_only_the_steps_after_the_warm_up(bench):
    timer = bench["harness"].StepTimer(warmup=2)
    module = torch.nn.Linear(1, 1)
    module.device = torch.device("cpu")
    for i in range(5):
        timer.on_train_batch_start(None, module, None, i)
        timer.on_train_batch_end(None, module, None, None, i)
    assert timer.batches == 5 and timer.seconds > 0
    assert timer.it_per_s == pytest.approx(3 / timer.seconds)
    assert bench["harness"].StepTimer(warmup=5).it_per_s is None  # nothing timed


# ----------------------------------------------------------------------------- the benchmarks, tiny, on a CPU


def _tiny_checkpoint(bench, tmp_path):
    """A train.py checkpoint of the tiny U-Net after one step, written by Lightning."""
    import lightning as L

    args = bench["training"].parse(["--tiny", "--device", "cpu"])
    module = bench["training"].make_module(args, dict(compile=False, step_graph=False))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(bench["training"].training_data(args, 16), batch_size=4))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    return tmp_path / "last.ckpt"


def test_sampling_benchmark_tiny_cpu(bench, tmp_path, capsys):
    """fp32 eager first, then the bf16 preset on the same x_T: rates, ratios, the distance of the images in 8-bit
    levels; from a train.py checkpoint (random weights take the same path after loading)."""
    ckpt = _tiny_checkpoint(bench, tmp_path)
    for extra in (["--ckpt", str(ckpt)],):
        rec = bench["sampling"].main(["--tiny", "--device", "cpu", "--batch", "2", "--steps", "2",  # Triton interpreted
                                       "--json", str(tmp_path / "s.json"), *extra])
        assert json.loads((tmp_path / "s.json").read_text())["rows"] == json.loads(json.dumps(rec["rows"]))
        assert [r["preset"] for r in rec["rows"]] == ["fp32", "bf16"] and rec["batch"] == 2 and rec["nfe"] == 2
        fp32, bf16 = rec["rows"]
        assert fp32["ratio"] == 1.0 and bf16["ratio"] == pytest.approx(bf16["images_per_s"] / fp32["images_per_s"])
        for r in rec["rows"]:
            assert r["images_per_s"] == pytest.approx(2 / r["seconds_median"]) and r["nonfinite"] == 0
        assert fp32["mean_levels"] == 0 and 0 < bf16["mean_levels"] <= bf16["max_levels"]  # bf16 rounds differently
        assert ("ckpt" in rec["model"]) == bool(extra)
        out = capsys.readouterr().out
        assert "| preset | images/s | x fp32 |" in out and "| bf16 |" in out


def test_sampling_benchmark_rejects_unknown_presets_and_fp8_without_fp8_hardware(bench, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        bench["sampling"].parse(["--device", "cpu", "--presets", "fp32,turbo"])
    assert "'turbo'" in capsys.readouterr().err
    monkeypatch.setattr(bench["sampling"], "fp8_supported", lambda device: False)
    with pytest.raises(SystemExit):
        bench["sampling"].parse(["--device", "cpu", "--presets", "fp8"])
    assert "fp8 needs a GPU" in capsys.readouterr().err
    assert bench["sampling"].parse(["--device", "cpu", "--presets", "bf16"]).presets == ["fp32", "bf16"]


def test_training_benchmark_tiny_cpu(bench, tmp_path, capsys):
    """The plain fp32 module and the fast one (bf16-mixed here) through Lightning, the timed steps' rate each."""
    rec = bench["training"].main(["--tiny", "--device", "cpu", "--steps", "2", "--json", str(tmp_path / "t.json")])
    assert json.loads((tmp_path / "t.json").read_text())["benchmark"] == "training"
    fp32, fast = rec["rows"]
    assert (fp32["row"], fp32["precision"], fast["row"], fast["precision"]) == ("fp32", "32-true", "fast", "bf16-mixed")
    assert (fast["compile"], fast["step_graph"]) == (False, False)  # off on a CPU by default
    for r in rec["rows"]:
        assert r["steps"] == 3 and r["it_per_s"] > 0 and math.isfinite(r["loss"])
        assert r["images_per_s"] == pytest.approx(4 * r["it_per_s"])
    assert fp32["ratio"] == 1.0 and fast["ratio"] == pytest.approx(fast["it_per_s"] / fp32["it_per_s"])
    assert "| fp32 | 32-true |" in capsys.readouterr().out


def test_ddp_benchmark_two_processes_tiny_cpu(tmp_path):
    """trainer=ddp's strategy (conf/trainer/ddp.yaml; train.py's ddp_step_graph has its own test) on 1 and 2 gloo
    processes: the ranks end with the same weights, sharded
    sampling gives exactly the one-process images, scaling is against the one-process row."""
    out = tmp_path / "ddp.json"
    env = child_env(CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "ddp.py"), "--world", "1,2", "--tiny", "--device",
                           "cpu", "--samples", "6", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert [r["world"] for r in rec["rows"]] == [1, 2] and rec["step_graph"] is False
    for r in rec["rows"]:
        assert r["weights_agree"] and r["same_images_as_first"] and r["max_u8_diff_to_first"] == 0
        assert r["train_images_per_s"] > 0 and r["sample_images_per_s"] > 0 and math.isfinite(r["loss"])
    assert rec["rows"][0]["train_scaling"] == 1.0 and rec["rows"][0]["sample_scaling"] == 1.0
    assert "| GPUs | train it/s |" in proc.stdout and "trainer=ddp)" in proc.stdout


def test_ddp_benchmark_rejects_bad_world(bench, capsys):
    for world in ("1,x", "0,1"):
        with pytest.raises(SystemExit):
            bench["ddp"].parse(["--world", world, "--device", "cpu"])
        assert repr(world) in capsys.readouterr().err
