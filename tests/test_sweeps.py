"""Sweeps: a 2x2 Hydra multirun, its resumption, aggregation into the paper's layout; the presets compose."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import REPO
from ddim.evaluation.tasks import fid_num_samples
from test_evaluate import fake_inception, one_thread, records, run_evaluate, tiny_ckpt  # noqa: F401  (fixtures)


def test_2x2_sweep_resumes_and_aggregates(monkeypatch, tmp_path, tiny_ckpt, fake_inception):  # noqa: F811
    """The quick Table 1 preset (quadratic τ; fp32 here, as the bf16 kernels run interpreted on a CPU) with its grid
    cut to 2x2 on the command line: one record per entry, a re-run redoes only what is missing, the aggregator writes Table 1 and FID against NFE."""
    from ddim.evaluation import aggregate, sampling

    calls = []
    real = sampling.sample_batch
    monkeypatch.setattr(sampling, "sample_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    sweep = ("+sweeps=table1_cifar10_quick", f"ckpt_path={tiny_ckpt}", "fid.num_samples=6", "sampler.batch_size=6",
             "sampler.eta=0.0,hat", "sampler.steps=2,4", "sampler.precision=fp32")
    run_evaluate(monkeypatch, tmp_path, *sweep, multirun=True)
    recs = records(tmp_path)
    assert sorted((str(r["key"]["sampler"]["eta"]), r["key"]["sampler"]["steps"]) for r in recs) == \
        [("0.0", 2), ("0.0", 4), ("hat", 2), ("hat", 4)]
    assert {(r["key"]["sampler"].get("precision"), r["key"]["sampler"]["trajectory"]) for r in recs} == {(None, "quadratic")}
    assert len(calls) == 4
    mtimes = {r["_path"]: Path(r["_path"]).stat().st_mtime_ns for r in recs}

    # a crash lost one entry: the re-run redoes only that one
    lost = next(p for p in mtimes if "etahat_S4" in p)
    Path(lost).unlink()
    run_evaluate(monkeypatch, tmp_path, *sweep, multirun=True)
    assert len(calls) == 5
    after = {r["_path"]: Path(r["_path"]).stat().st_mtime_ns for r in records(tmp_path)}
    assert set(after) == set(mtimes)
    assert all(after[p] == mtimes[p] for p in mtimes if p != lost)

    res = aggregate.main([str(tmp_path / "records"), "--out", str(tmp_path / "tables")])
    md = Path(res["table1_md"]).read_text()
    assert "## digits-8, tiny.ckpt, EMA, ddim, quadratic trajectory, 6 samples\n" in md
    assert "| η \\ S | 2 | 4 |" in md and "| 0.0 |" in md and "| σ̂ |" in md
    fids = {(r["key"]["sampler"]["eta"], r["key"]["sampler"]["steps"]): r["metric"]["fid"] for r in recs}
    assert f"{fids[(0.0, 2)]:.2f}" in md
    with open(res["table1_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["eta"] for r in rows} == {"0.0", "hat"}
    assert Path(res["fid_vs_steps_png"]).stat().st_size > 1000
    # the η = 0 runs also make the FID-against-NFE table, in columns of the NFE each spent (2 and 4)
    nfe_md = Path(res["fid_vs_nfe_md"]).read_text()
    assert "| sampler \\ NFE | 2 | 4 |" in nfe_md and f"| ddim | {fids[(0.0, 2)]:.2f} | {fids[(0.0, 4)]:.2f} |" in nfe_md


def test_aggregate_puts_paper_numbers_beside_ours(tmp_path):
    from ddim.evaluation import aggregate
    from ddim.evaluation.records import record_path, write_record

    def put(task, ds, eta, steps, metric):
        key = {"task": task, "dataset": ds, "model": {"official": "cifar10"}, "seed": 0, "params": {},
               "sampler": {"kind": "ddim", "eta": eta, "steps": steps, "trajectory": "quadratic"}}
        write_record(record_path(tmp_path, key), {"task": task, "key": key, "metric": metric, "num_samples": 10})

    put("fid", "cifar10-32", 0.0, 10, {"fid": 12.5})
    put("fid", "cifar10-32", "hat", 1000, {"fid": 3.5})
    put("reconstruction", "cifar10-32", 0.0, 10, {"mse": 0.02})
    res = aggregate.aggregate(tmp_path, tmp_path / "out")
    t1 = Path(res["table1_md"]).read_text()
    assert "12.50 (13.36)" in t1 and "3.50 (3.17)" in t1
    assert "– (6.84)" in t1  # the paper's cell is shown even where we have no run
    t2 = Path(res["table2_md"]).read_text()
    assert "| ours | 0.02 |" in t2 and "| paper | 0.014 | 0.0065 |" in t2


def test_aggregate_takes_the_newest_result_of_a_rewritten_checkpoint(tmp_path):
    """last.ckpt evaluated, rewritten, evaluated again: two records (the key holds the file's mtime) with the
    same label and cell; the table shows the later one, whatever order the files are read in."""
    from ddim.evaluation import aggregate
    from ddim.evaluation.records import record_path, write_record

    for mtime, fid, finished in ((2, 30.0, "2026-11-23T10:00:00+0000"), (1, 40.0, "2026-11-22T10:00:00+0000"),
                                 (3, 20.0, "2026-11-24T10:00:00+0000")):
        key = {"task": "fid", "dataset": "cifar10-32", "model": {"ckpt": "/runs/last.ckpt", "mtime_ns": mtime},
               "seed": 0, "params": {}, "sampler": {"kind": "ddim", "eta": 0.0, "steps": 10, "trajectory": "quadratic"}}
        write_record(record_path(tmp_path, key), {"task": "fid", "key": key, "metric": {"fid": fid}, "num_samples": 10,
                                                  "finished_at": finished})
    t1 = Path(aggregate.aggregate(tmp_path, tmp_path / "out")["table1_md"]).read_text()
    assert "20.00 (13.36)" in t1 and "30.00" not in t1 and "40.00" not in t1


def _compose(*overrides):
    """evaluate.py's config as Hydra composes it: ``sweeps/`` comes from the search-path plugin (no searchpath
    override), whatever the working directory."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("preset, task, grid", [
    ("table1_cifar10", "fid", {"sampler.eta": "0.0,0.2,0.5,1.0,hat", "sampler.steps": "10,20,50,100,1000"}),
    ("table1_cifar10_quick", "fid", {"sampler.eta": "0.0,1.0,hat", "sampler.steps": "10,20,50,100"}),
    ("table1_celeba", "fid", {"sampler.eta": "0.0,0.2,0.5,1.0,hat", "sampler.steps": "10,20,50,100,1000"}),
    ("table2_cifar10", "reconstruction", {"sampler.steps": "10,20,50,100,200,500,1000"}),
    ("table2_cifar10_quick", "reconstruction", {"sampler.steps": "10,20,50,100,200,500,1000"}),
    ("fid_vs_nfe_cifar10", "fid", {"sampler.kind": "ddim,plms,dpmpp_2m,heun",
                                   "fid_vs_nfe.budget": "nfe5,nfe10,nfe20,nfe50,nfe100"}),
    ("fid_vs_nfe_cifar10_quick", "fid", {"sampler.kind": "ddim,plms,dpmpp_2m,heun",
                                         "fid_vs_nfe.budget": "nfe5,nfe10,nfe20,nfe50,nfe100"}),
    ("table3_church", "fid", {"sampler.eta": "0.0,1.0", "sampler.steps": "10,20,50,100"}),
    ("table3_bedroom", "fid", {"sampler.eta": "0.0,1.0", "sampler.steps": "10,20,50,100"}),
])
def test_sweep_presets(preset, task, grid, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # found from any working directory
    cfg = _compose(f"+sweeps={preset}")
    assert cfg.task == task
    assert dict(cfg.hydra.sweeper.params) == grid
    assert cfg.sampler.trajectory == {"table1_cifar10": "quadratic", "table1_cifar10_quick": "quadratic",
                                      "table1_celeba": "linear", "fid_vs_nfe_cifar10": "quadratic",
                                      "fid_vs_nfe_cifar10_quick": "quadratic", "table3_church": "linear",
                                      "table3_bedroom": "linear"}.get(preset)
    quick_fid = preset in ("table1_cifar10_quick", "fid_vs_nfe_cifar10_quick")
    # fid.num_samples: the preset's, else null = the data set's default (the paper's 50,000 on its data sets)
    samples = fid_num_samples(OmegaConf.to_container(cfg.fid), {"name": "cifar10"})
    assert (cfg.sampler.precision, samples) == (("bf16", 5000) if quick_fid else ("fp32", 50000))
    assert cfg.reconstruction.num_images == (1000 if preset == "table2_cifar10_quick" else None)
    if preset.startswith("fid_vs_nfe"):  # the S of each (sampler, budget) resolves from the preset's table
        assert cfg.sampler.steps == cfg.fid_vs_nfe.steps.ddim.nfe10 == 10
    slurm = _compose(f"+sweeps={preset}", "+sweeps/launcher=slurm")
    assert "submitit" in slurm.hydra.launcher._target_ and slurm.hydra.launcher.gpus_per_node == 1


@pytest.mark.parametrize("name", ["table1_cifar10", "table1_celeba", "table2_cifar10"])
def test_wandb_sweep_files_are_valid_overrides(name):
    """Every value of each W&B grid axis composes to a valid evaluate config (option names as evaluate.py has
    them: a renamed option would fail to compose)."""
    spec = yaml.safe_load((REPO / "sweeps" / "wandb" / f"{name}.yaml").read_text())
    assert spec["program"] == "evaluate.py" and spec["method"] == "grid"
    params = spec["parameters"]
    grids = {k: v["values"] if "values" in v else [v["value"]] for k, v in params.items()}
    from ddim.evaluation.settings import parse_eta

    combos = {tuple(v[0] for v in grids.values())}  # every value of every axis once, the others at their first
    for i, (k, vals) in enumerate(grids.items()):
        combos |= {tuple(v if j == i else grids[kk][0] for j, kk in enumerate(grids)) for v in vals}
    for combo in combos:
        cfg = _compose(*[f"{k}={v}" for k, v in zip(grids, combo)])
        parse_eta(cfg.sampler.eta)
        assert cfg.task in ("fid", "reconstruction") and cfg.sampler.steps in grids["sampler.steps"]
    n = 1
    for v in grids.values():
        n *= len(v)
    assert n == {"table1_cifar10": 25, "table1_celeba": 25, "table2_cifar10": 7}[name]


def test_aggregate_logs_table_and_plot_to_wandb_offline(tmp_path, monkeypatch):
    """`python -m ddim.evaluation.aggregate RECORDS --wandb PROJECT`: one W&B run (offline here) holding the table and
    the FID-vs-S plot; the run's files are written like any offline run, ready for `wandb sync`."""
    from ddim.evaluation import aggregate
    from ddim.evaluation.records import record_path, write_record

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logged = []
    import wandb

    real_init = wandb.init

    def init(*a, **k):
        run = real_init(*a, **k)
        real_log = run.log
        run.log = lambda d, *x, **y: (logged.append(d), real_log(d, *x, **y))[1]
        return run

    monkeypatch.setattr(wandb, "init", init)
    for eta, steps, fid in ((0.0, 10, 12.5), (0.0, 20, 7.0), ("hat", 10, 300.0)):
        key = {"task": "fid", "dataset": "cifar10-32", "model": {"official": "cifar10"}, "seed": 0, "params": {},
               "sampler": {"kind": "ddim", "eta": eta, "steps": steps, "trajectory": "quadratic"}}
        write_record(record_path(tmp_path / "rec", key), {"task": "fid", "key": key, "metric": {"fid": fid},
                                                         "num_samples": 10})
    aggregate.main([str(tmp_path / "rec"), "--out", str(tmp_path / "out"), "--wandb", "ddim-test"])
    table = next(d["results"] for d in logged if "results" in d)
    assert isinstance(table, wandb.Table) and len(table.data) == 3
    assert any("fid_vs_steps" in d for d in logged) and any("fid_vs_nfe" in d for d in logged)
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))


def test_fid_vs_nfe_aggregate_table_and_plot(tmp_path):
    """The FID-against-NFE sweep's records: rows sampler, columns budget, 'FID @n' where a run spent less; its
    runs stay out of Table 1; η ≠ 0 runs stay out of this table."""
    from ddim.evaluation import aggregate
    from ddim.evaluation.records import record_path, write_record

    steps = {"ddim": {5: 5, 10: 10}, "plms": {5: 4, 10: 9}, "dpmpp_2m": {5: 5, 10: 10}, "heun": {5: 3, 10: 5}}
    fids = {}
    for i, (kind, table) in enumerate(steps.items()):
        for budget, S in table.items():
            for eta in (0.0, 0.5) if kind == "ddim" else (0.0,):
                key = {"task": "fid", "dataset": "cifar10-32", "model": {"official": "cifar10", "path": "x"},
                       "seed": 0, "params": {"num_samples": 100},
                       "sampler": {"kind": kind, "eta": eta, "steps": S, "trajectory": "quadratic"}}
                fid = 100.0 / budget + i + (50 if eta else 0)
                fids[(kind, budget, eta)] = fid
                sweep = {} if eta else {"fid_vs_nfe": {"T": 1000, "budget": f"nfe{budget}"}}
                write_record(record_path(tmp_path / "records", key),
                             {"task": "fid", "key": key, "metric": {"fid": fid}, "num_samples": 100, "config": sweep})
    res = aggregate.main([str(tmp_path / "records"), "--out", str(tmp_path / "tables")])
    md = res["fid_vs_nfe_md"].read_text()
    assert "## cifar10-32, official cifar10, quadratic trajectory, 100 samples" in md
    assert "| sampler \\ NFE | 5 | 10 |" in md
    assert f"| heun | {fids[('heun', 5, 0.0)]:.2f} | {fids[('heun', 10, 0.0)]:.2f} @9 |" in md  # 2*5-1 = 9 < 10
    assert f"| plms | {fids[('plms', 5, 0.0)]:.2f} | {fids[('plms', 10, 0.0)]:.2f} |" in md
    assert "| ddim (paper) | – | 13.36 |" in md  # Table 1, cifar10, eta 0, S = 10
    assert res["fid_vs_nfe_png"].stat().st_size > 1000 and len(res["fid_vs_nfe_csv"].read_text().splitlines()) == 9
    # Table 1 holds the η = 0.5 runs; the sweep's DDIM runs fill its η = 0 cells, its solvers add no block
    t1 = res["table1_md"].read_text()
    assert "| η \\ S | 5 | 10 | 20 | 50 | 100 | 1000 |" in t1 and "plms" not in t1
    assert f"| 0.0 | {fids[('ddim', 5, 0.0)]:.2f} | {fids[('ddim', 10, 0.0)]:.2f} (13.36) | – (6.84) |" in t1
    assert f"| 0.5 | {fids[('ddim', 5, 0.5)]:.2f} | {fids[('ddim', 10, 0.5)]:.2f} (16.66) |" in t1


def test_table1_keeps_precisions_and_sample_counts_apart(tmp_path):
    """A bf16 5,000-sample run and an fp32 50,000-sample run of the same cell are two blocks, not one overwritten."""
    from ddim.evaluation import aggregate
    from ddim.evaluation.records import record_path, write_record

    for precision, n, fid in (("fp32", 50000, 4.5), ("bf16", 5000, 9.5)):
        sampler = {"kind": "ddim", "eta": 0.0, "steps": 10, "trajectory": "quadratic"}
        if precision != "fp32":
            sampler["precision"] = precision
        key = {"task": "fid", "dataset": "cifar10-32", "model": {"ckpt": "/runs/last.ckpt"}, "seed": 0,
               "params": {"num_samples": n}, "sampler": sampler}
        write_record(record_path(tmp_path, key), {"task": "fid", "key": key, "metric": {"fid": fid}, "num_samples": n})
    t1 = aggregate.aggregate(tmp_path, tmp_path / "out")["table1_md"].read_text()
    assert "## cifar10-32, last.ckpt, ddim, quadratic trajectory, 5000 samples, bf16" in t1
    assert "## cifar10-32, last.ckpt, ddim, quadratic trajectory, 50000 samples\n" in t1
    assert "9.50 (13.36)" in t1 and "4.50 (13.36)" in t1


def test_two_runs_with_one_checkpoint_name_are_two_blocks(tmp_path):
    """Every train.py run saves checkpoints/last.ckpt: two runs are told apart by their run folders (one newest value
    used to fill the cell, the other's only in the CSV); the checkpoint keeps its plain name where it is alone."""
    from ddim.evaluation import aggregate
    from ddim.evaluation.records import record_path, write_record

    for run, mse in (("quad", 0.0016), ("geometric", 0.0119)):
        key = {"task": "reconstruction", "dataset": "digits-8", "seed": 0, "params": {"num_images": 20},
               "model": {"ckpt": f"/outputs/train/digits/{run}/checkpoints/last.ckpt", "use_ema": True},
               "sampler": {"kind": "ddim", "eta": 0.0, "steps": 5, "trajectory": "linear"}}
        write_record(record_path(tmp_path, key), {"task": "reconstruction", "key": key, "metric": {"mse": mse},
                                                  "num_samples": 20})
    t2 = aggregate.aggregate(tmp_path, tmp_path / "out")["table2_md"].read_text()
    for run, mse in (("quad", "0.0016"), ("geometric", "0.0119")):
        block = t2.split(f"digits-8, {run}/checkpoints/last.ckpt, EMA")[1].split("##")[0]
        assert mse in block
    assert aggregate.checkpoint_names({"/a/last.ckpt"}) == {"/a/last.ckpt": "last.ckpt"}
    assert aggregate.checkpoint_names({"/r/a.ckpt", "/r/b/a.ckpt"}) == {"/r/a.ckpt": "r/a.ckpt", "/r/b/a.ckpt": "b/a.ckpt"}


def test_a_sigma_rule_named_by_a_string_gets_its_own_row(tmp_path):
    """A σ rule added to ddim.diffusion.ETA_STRINGS (here "beta") is a row after the numbers and σ̂, in the table
    and the plot; the aggregator once failed on it with "could not convert string to float"."""
    from ddim.evaluation import aggregate
    from ddim.evaluation.records import record_path, write_record

    for eta, fid in ((0.0, 20.0), ("beta", 30.0), ("hat", 40.0)):
        key = {"task": "fid", "dataset": "cifar10-32", "model": {"ckpt": "/runs/last.ckpt"}, "seed": 0,
               "params": {"num_samples": 100},
               "sampler": {"kind": "ddim", "eta": eta, "steps": 10, "trajectory": "quadratic"}}
        write_record(record_path(tmp_path, key), {"task": "fid", "key": key, "metric": {"fid": fid}, "num_samples": 100})
    res = aggregate.aggregate(tmp_path, tmp_path / "out")
    rows = [line.split(" |")[0] for line in res["table1_md"].read_text().splitlines() if line.startswith("| ")]
    assert rows[1:] == ["| 0.0", "| σ̂", "| beta"] and res["fid_vs_steps_png"].is_file()


def test_sampler_eta_takes_the_sigma_rules_the_sampler_names(monkeypatch):
    """sampler.eta reads the σ rules from ddim.diffusion.samplers.ETA_STRINGS, not a list of its own."""
    from ddim.evaluation import settings

    assert [settings.parse_eta(e) for e in ("HAT", "σ̂", "sigma_hat", "0.5", 1)] == ["hat", "hat", "hat", 0.5, 1.0]
    with pytest.raises(ValueError, match=r"sampler.eta must be a number >= 0 or 'hat', got 'beta'"):
        settings.parse_eta("beta")
    monkeypatch.setattr(settings, "ETA_STRINGS", ("hat", "beta"))
    assert settings.parse_eta("beta") == "beta"


def test_fid_vs_nfe_puts_table1_runs_into_the_sweeps_budgets(tmp_path):
    """Table 1's DDIM S = 50 on quadratic τ spends 49 NFE and the sweep's S = 51 spends 50: one column '50' showing
    the sweep's run, not a column 49 beside it; S = 10 (shared by both) fills the column 10."""
    from ddim.evaluation import aggregate
    from ddim.evaluation.records import record_path, write_record

    runs = [(10, 10, None, 20.0), (50, 49, None, 15.5), (51, 50, "nfe50", 15.25), (5, 5, "nfe5", 44.0)]
    for steps, nfe, budget, fid in runs:
        key = {"task": "fid", "dataset": "cifar10-32", "model": {"ckpt": "/runs/last.ckpt"}, "seed": 0,
               "params": {"num_samples": 100},
               "sampler": {"kind": "ddim", "eta": 0.0, "steps": steps, "trajectory": "quadratic"}}
        config = {"fid_vs_nfe": {"T": 1000, "budget": budget}} if budget else {}
        write_record(record_path(tmp_path, key), {"task": "fid", "key": key, "metric": {"fid": fid}, "nfe": nfe,
                                                  "num_samples": 100, "config": config})
    md = aggregate.aggregate(tmp_path, tmp_path / "out")["fid_vs_nfe_md"].read_text()
    assert "| sampler \\ NFE | 5 | 10 | 50 |" in md
    assert "| ddim | 44.00 | 20.00 | 15.25 |" in md


def test_tables_say_which_weights_ema_or_not(tmp_path):
    """The EMA and the raw weights of one model are two blocks, each titled with which; a diffusers model by its id."""
    from ddim.evaluation import aggregate
    from ddim.evaluation.records import record_path, write_record

    models = [({"official": "cifar10", "path": "x", "use_ema": True}, 4.5),
              ({"official": "cifar10", "path": "x", "use_ema": False}, 12.5),
              ({"pretrained": "google/ddpm-cifar10-32", "revision": "abc", "ema": False}, 13.5)]
    for model, fid in models:
        key = {"task": "fid", "dataset": "cifar10-32", "model": model, "seed": 0, "params": {"num_samples": 100},
               "sampler": {"kind": "ddim", "eta": 0.0, "steps": 10, "trajectory": "quadratic"}}
        write_record(record_path(tmp_path, key), {"task": "fid", "key": key, "metric": {"fid": fid}, "num_samples": 100})
    t1 = aggregate.aggregate(tmp_path, tmp_path / "out")["table1_md"].read_text()
    assert "## cifar10-32, official cifar10, EMA, ddim," in t1 and "4.50 (13.36)" in t1
    assert "## cifar10-32, official cifar10, not EMA, ddim," in t1 and "12.50 (13.36)" in t1
    assert "## cifar10-32, google/ddpm-cifar10-32, not EMA, ddim," in t1 and "13.50 (13.36)" in t1


def test_aggregate_puts_table3_beside_lsun_and_names_the_reference(tmp_path):
    """LSUN church and bedroom at 256: the paper's Table 3 (DDIM η = 0, DDPM η = 1; S = 10, 20, 50, 100) beside ours;
    a run against a fid.ref_stats file is its own block, titled with the file."""
    from ddim.evaluation import aggregate
    from ddim.evaluation.records import record_path, write_record

    def put(ds, eta, steps, fid, ref=None):
        params = {"num_samples": 50000, **({"ref_stats": ref} if ref else {"ref_split": "train"})}
        key = {"task": "fid", "dataset": ds, "model": {"official": ds.split("-")[1]}, "seed": 0, "params": params,
               "sampler": {"kind": "ddim", "eta": eta, "steps": steps, "trajectory": "linear"}}
        write_record(record_path(tmp_path, key), {"task": "fid", "key": key, "metric": {"fid": fid},
                                                  "num_samples": 50000})

    put("lsun-church_outdoor-256", 0.0, 10, 20.5)
    put("lsun-church_outdoor-256", 1.0, 100, 8.5, ref={"file": "church_stats.npz", "sha1": "0123456789abcdef"})
    put("lsun-bedroom-256", 1.0, 20, 23.0)
    put("lsun-bedroom-128", 0.0, 10, 30.0)  # not the paper's resolution: no paper values
    t = aggregate.table1_markdown(aggregate.table1_rows(aggregate.collect(tmp_path)))  # no plots: fast
    church = t.split("## lsun-church_outdoor-256, official church_outdoor, ddim, linear trajectory, 50000 samples\n")[1]
    assert "| η \\ S | 10 | 20 | 50 | 100 |" in church
    assert "| 0.0 | 20.50 (19.45) | – (12.47) | – (10.84) | – (10.58) |" in church
    assert ("## lsun-church_outdoor-256, official church_outdoor, ddim, linear trajectory, 50000 samples, "
            "reference church_stats.npz (sha1 01234567)") in t
    assert "| 1.0 | – (51.56) | – (23.37) | – (11.16) | 8.50 (8.27) |" in t
    assert "| 1.0 | – (42.78) | 23.00 (22.77) | – (10.81) | – (6.81) |" in t
    assert "| 0.0 | 30.00 |" in t
