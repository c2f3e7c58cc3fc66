"""scripts/cifar10_gpu.py (the one-GPU CIFAR-10 train + Table 1/2 run) end to end on CPU, tiny sizes.

The pack is generated here in the format of ../shared/data/cifar10_jpeg_q75.npz (JPEG scans + offsets).
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def make_pack(path: Path, n_train: int = 24, n_test: int = 8) -> None:
    rng = np.random.default_rng(0)
    arrays = {"jpeg_header": np.zeros(0, np.uint8), "classes": np.array(["a", "b"])}
    for split, n in (("train", n_train), ("test", n_test)):
        blobs = []
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG", quality=75)
            blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
        arrays[f"{split}_scans"] = np.concatenate(blobs)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs])
    np.savez(path, **arrays)


def run(*args: str) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "cifar10_gpu.py"), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


@pytest.mark.slow
def test_train_then_eval_writes_tables_plot_and_grids(tmp_path: Path) -> None:
    pack, out = tmp_path / "pack.npz", tmp_path / "run"
    make_pack(pack)
    run("train", "--tiny", "--no-fast", "--device", "cpu", "--data", str(pack), "--out", str(out),
        "--batch", "8", "--max-steps", "3", "--log-every", "1", "--minutes", "5")
    train = json.loads((out / "train.json").read_text())
    assert train["steps"] == 3 and (out / "ckpt.pt").is_file()

    stdout = run("eval", "--no-fast", "--no-fid", "--device", "cpu", "--data", str(pack), "--out", str(out),
                 "--samples", "8", "--batch", "4", "--etas", "0,hat", "--steps", "2,4", "--recon", "4",
                 "--recon-steps", "2,4", "--nfe", "2,5")
    res = json.loads((out / "results.json").read_text())
    assert [(c["eta"], c["S"]) for c in res["table1"]] == [("0.0", 2), ("0.0", 4), ("hat", 2), ("hat", 4)]
    assert [c["S"] for c in res["table2"]] == [2, 4]
    assert all(0.0 < c["mse"] < 1.0 and c["images"] == 4 for c in res["table2"])
    assert res["reference_images"] == 24 and res["train_steps"] == 3 and res["eval_seconds"] > 0
    # FID vs NFE: every (sampler, budget) that fits spends at most its budget; NFE 2 is below every
    # solver's minimum (PLMS, Heun 3, DPM-Solver++(2M) 3), so only DDIM runs there
    cells = {(c["kind"], c["budget"]): c for c in res["fid_vs_nfe"]}
    assert set(cells) == {("ddim", 2), ("ddim", 5), ("plms", 5), ("dpmpp_2m", 5), ("heun", 5)}
    assert all(c["nfe"] <= c["budget"] for c in cells.values())
    assert "FID against NFE" in (out / "tables.md").read_text()
    assert "Table 2" in stdout and (out / "tables.md").read_text().count("|") > 10
    for name in ("samples_eta0.0_S4.png", "samples_eta0.0_S2.png"):
        assert Image.open(out / name).size[0] > 32


def tiny_run_with_fid_stand_in(tmp_path: Path, monkeypatch):
    """The script as a module, a tiny CPU model trained 2 steps into tmp_path/run, and its FID replaced by a
    stand-in that returns 11, 12, ... and records the shapes it was given (the real FID needs the
    Inception weights; ddim.evaluation.fid is tested elsewhere)."""
    pack, out = tmp_path / "pack.npz", tmp_path / "run"
    make_pack(pack)
    mod = load_script("scripts/cifar10_gpu.py")
    common = ["--no-fast", "--device", "cpu", "--data", str(pack), "--out", str(out)]
    mod.main(["train", "--tiny", *common, "--batch", "8", "--max-steps", "2", "--log-every", "1"])
    calls = []
    monkeypatch.setattr(mod, "fid_of", lambda imgs, ref, args: calls.append(imgs.shape) or 10.0 + len(calls))
    return mod, out, common, calls


@pytest.mark.slow
def test_eval_reports_with_fid_plots_and_tables(tmp_path: Path, monkeypatch) -> None:
    """The FID-dependent outputs (fid_vs_S.png, fid_vs_nfe.png, the tables' numbers), FID stood in for."""
    mod, out, common, calls = tiny_run_with_fid_stand_in(tmp_path, monkeypatch)
    mod.main(["eval", *common, "--samples", "6", "--batch", "3", "--etas", "0,1", "--steps", "2,4", "--recon", "3",
              "--recon-steps", "2", "--nfe", "5"])
    res = json.loads((out / "results.json").read_text())
    assert len(calls) == 4 + 4 and all(shape == (6, 3, 32, 32) for shape in calls)  # Table 1 + one per sampler
    assert [c["fid"] for c in res["table1"]] == [11.0, 12.0, 13.0, 14.0]
    tables = (out / "tables.md").read_text()
    assert "| η = 0 (DDIM) | 11.00 | 12.00 |" in tables and "| DPM-Solver++(2M) |" in tables
    for name in ("fid_vs_S.png", "fid_vs_nfe.png"):
        assert Image.open(out / name).size[0] > 100
    # `report` re-draws both from results.json alone
    for name in ("fid_vs_S.png", "fid_vs_nfe.png", "tables.md"):
        (out / name).unlink()
    mod.main(["report", "--out", str(out)])
    assert (out / "tables.md").read_text() == tables
    assert all(Image.open(out / name).size[0] > 100 for name in ("fid_vs_S.png", "fid_vs_nfe.png"))


@pytest.mark.slow
def test_eval_resume_computes_only_the_missing_cells(tmp_path: Path, monkeypatch) -> None:
    mod, out, common, calls = tiny_run_with_fid_stand_in(tmp_path, monkeypatch)
    cells = ["--samples", "4", "--batch", "4", "--etas", "0", "--recon", "2"]
    mod.main(["eval", *common, *cells, "--steps", "2", "--recon-steps", "2"])  # a run cut after one cell each
    first = json.loads((out / "results.json").read_text())
    assert len(calls) == 1

    mod.main(["eval", *common, *cells, "--steps", "2,4", "--recon-steps", "2,3", "--resume"])
    res = json.loads((out / "results.json").read_text())
    assert len(calls) == 2  # only S = 4 was sampled and scored
    assert res["table1"][0] == first["table1"][0] and [c["S"] for c in res["table1"]] == [2, 4]
    assert res["table2"][0] == first["table2"][0] and [c["S"] for c in res["table2"]] == [2, 3]
    assert len(res["commands"]) == 2 and res["eval_seconds"] > first["eval_seconds"]
    assert "| η = 0 (DDIM) | 11.00 | 12.00 |" in (out / "tables.md").read_text()

    # other settings: a clear error naming them, and the finished results stay as they were
    before = (out / "results.json").read_bytes()
    with pytest.raises(SystemExit, match=r"samples: 4 there, 6 here"):
        mod.main(["eval", *common, *cells[2:], "--samples", "6", "--steps", "2", "--resume"])
    assert (out / "results.json").read_bytes() == before and len(calls) == 2


@pytest.mark.slow
def test_train_resume_equals_one_uninterrupted_run_and_refuses_other_settings(tmp_path: Path) -> None:
    """Training cut after 3 steps and resumed to 6 ends with the weights, EMA, Adam state and losses of a run
    of 6: the checkpoint holds the optimizer, the data order and the RNG."""
    import torch

    mod, pack = load_script("scripts/cifar10_gpu.py"), tmp_path / "pack.npz"
    make_pack(pack)
    common = ["train", "--tiny", "--no-fast", "--device", "cpu", "--data", str(pack), "--batch", "8",
              "--log-every", "1"]
    mod.main([*common, "--out", str(tmp_path / "once"), "--max-steps", "6"])
    mod.main([*common, "--out", str(tmp_path / "cut"), "--max-steps", "3"])
    mod.main([*common, "--out", str(tmp_path / "cut"), "--max-steps", "6", "--resume"])
    once, cut = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in ("once", "cut"))
    assert once["steps"] == cut["steps"] == 6
    for part in ("model", "ema"):
        assert all(torch.equal(once[part][k], cut[part][k]) for k in once[part]), part
    adam_once, adam_cut = once["optimizer"]["state"], cut["optimizer"]["state"]
    assert float(adam_cut[0]["step"]) == 6
    assert all(torch.equal(adam_once[i]["exp_avg_sq"], adam_cut[i]["exp_avg_sq"]) for i in adam_once)
    assert [(r["step"], r["loss"]) for r in cut["losses"]] == [(r["step"], r["loss"]) for r in once["losses"]]
    assert json.loads((tmp_path / "cut" / "train.json").read_text())["resumed_from"] == 3
    # a log line holds the mean loss of the steps since the line before (a resumed run's first line: one step)
    loss = {r["step"]: r["loss"] for r in once["losses"]}  # --log-every 1: every step's own loss
    mod.main([*common[:-1], "4", "--out", str(tmp_path / "every4"), "--max-steps", "2"])
    mod.main([*common[:-1], "4", "--out", str(tmp_path / "every4"), "--max-steps", "6", "--resume"])
    lines = torch.load(tmp_path / "every4" / "ckpt.pt", weights_only=False)["losses"]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 6]
    expect = [loss[1], loss[2], loss[3], loss[4], (loss[5] + loss[6]) / 2]
    assert [r["loss"] for r in lines] == pytest.approx(expect, rel=1e-6)

    # other settings, or nothing left to do: a clear error, and the checkpoint stays as it was
    before = (tmp_path / "cut" / "ckpt.pt").read_bytes()
    for extra, match in ((["--ema", "0.99", "--max-steps", "9"], r"ema_decay: checkpoint 0.9995, now 0.99"),
                         (["--max-steps", "6"], r"already has 6 steps"),
                         (["--limit", "16", "--max-steps", "9"], r"limit: checkpoint None, now 16")):
        with pytest.raises(SystemExit, match=match):
            mod.main([*common, "--out", str(tmp_path / "cut"), "--resume", *extra])
    assert (tmp_path / "cut" / "ckpt.pt").read_bytes() == before
    with pytest.raises(SystemExit, match=r"no checkpoint at .*none.*ckpt.pt"):
        mod.main([*common, "--out", str(tmp_path / "none"), "--resume"])


@pytest.mark.slow
def test_train_keeps_periodic_checkpoints_and_stops_on_budget_between_log_lines(tmp_path: Path, monkeypatch) -> None:
    """A run killed from outside keeps its last periodic checkpoint, which resumes to the weights of an
    uninterrupted run; and the wall-clock budget stops training at the step it runs out, not at the next log line."""
    import types

    import torch

    mod, pack = load_script("scripts/cifar10_gpu.py"), tmp_path / "pack.npz"
    make_pack(pack)
    common = ["train", "--tiny", "--no-fast", "--device", "cpu", "--data", str(pack), "--batch", "8",
              "--log-every", "100"]
    mod.main([*common, "--out", str(tmp_path / "once"), "--max-steps", "6"])

    real_save, saved = torch.save, []

    def killed_after_third_save(obj, path):  # the job's time limit strikes while step 4 is being saved
        if len(saved) == 3:
            raise KeyboardInterrupt("killed")
        saved.append(obj["steps"])
        real_save(obj, path)

    monkeypatch.setattr(mod.torch, "save", killed_after_third_save)
    with pytest.raises(KeyboardInterrupt):
        mod.main([*common, "--out", str(tmp_path / "cut"), "--max-steps", "6", "--save-minutes", "1e-9"])
    monkeypatch.setattr(mod.torch, "save", real_save)
    assert saved == [1, 2, 3]
    assert torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=False)["steps"] == 3
    mod.main([*common, "--out", str(tmp_path / "cut"), "--max-steps", "6", "--resume"])
    once, cut = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in ("once", "cut"))
    assert cut["steps"] == 6 and all(torch.equal(once["ema"][k], cut["ema"][k]) for k in once["ema"])

    # a clock that moves one second per reading: a 6 s budget runs out within a few steps, long before the
    # next log line (step 100) or --max-steps
    ticks = iter(range(10**6))
    monkeypatch.setattr(mod, "time", types.SimpleNamespace(time=lambda: float(next(ticks)), strftime=mod.time.strftime))
    mod.main([*common, "--out", str(tmp_path / "budget"), "--max-steps", "50", "--minutes", "0.1"])
    steps = json.loads((tmp_path / "budget" / "train.json").read_text())["steps"]
    assert 1 < steps < 10


def test_export_keeps_what_sampling_needs(tmp_path: Path, capsys) -> None:
    """export writes the EMA weights, config and step count, which load_ema_unet (and so the benchmarks' --ckpt)
    read as from ckpt.pt, in a file without the training weights and Adam moments."""
    import torch

    mod, pack = load_script("scripts/cifar10_gpu.py"), tmp_path / "pack.npz"
    make_pack(pack)
    mod.main(["train", "--tiny", "--no-fast", "--device", "cpu", "--data", str(pack), "--batch", "8",
              "--out", str(tmp_path / "run"), "--max-steps", "2"])
    mod.main(["export", "--out", str(tmp_path / "run")])
    capsys.readouterr()
    (full, ck_full), (slim, ck_slim) = (mod.load_ema_unet(tmp_path / "run" / f) for f in ("ckpt.pt", "ema.pt"))
    # two warm-up updates leave 1/10 * 2/11 = 1.8 % of the initial weights: said on loading, from either file
    assert capsys.readouterr().out.count("still hold 1.8% of the initial (random) weights") == 2
    assert ck_slim["steps"] == ck_full["steps"] == 2 and ck_slim["unet"] == ck_full["unet"]
    assert "model" not in ck_slim and "optimizer" not in ck_slim
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), slim.state_dict().values()))
    # the EMA differs from the trained weights after 2 steps, so this is the EMA and not the model
    assert not all(torch.equal(ck_full["model"][k], v) for k, v in ck_slim["ema"].items())
    assert (tmp_path / "run" / "ema.pt").stat().st_size < (tmp_path / "run" / "ckpt.pt").stat().st_size / 2
    mod.main(["export", "--out", str(tmp_path / "run"), "--to", str(tmp_path / "elsewhere" / "m.pt")])
    assert mod.load_ema_unet(tmp_path / "elsewhere" / "m.pt")[1]["steps"] == 2
    with pytest.raises(SystemExit, match=r"export: no checkpoint at .*none.*ckpt.pt: run `train --out"):
        mod.main(["export", "--out", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("args, match", [(("eval", "--etas", "0,-1"), "--etas"), (("eval", "--nfe", "5,x"), "--nfe"),
                                         (("eval", "--steps", "10,0"), "--steps"),
                                         (("all", "--resume"), "`train --resume`")])
def test_bad_arguments_fail_before_any_work(tmp_path: Path, args, match) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "cifar10_gpu.py"), *args, "--out", str(tmp_path / "none"),
                        "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and match in r.stderr and args[1] in r.stderr
    assert not (tmp_path / "none").exists()
