"""Collect evaluation records into the paper's Table 1 / Table 2 / Table 3 layouts beside the published numbers, and
FID against the number of network evaluations (NFE) for the ODE samplers.

    python -m ddim.evaluation.aggregate outputs/records [--out outputs/records/tables] [--wandb PROJECT]

Writes, for the records found:

* ``table1.md`` / ``.csv``: FID, rows η, columns S, cells ``ours (paper)`` (Table 1 for CIFAR-10 and CelebA, Table 3
  for LSUN bedroom and church); one block per data set, model, sampler, trajectory and setting (number of samples,
  precision, a ``fid.ref_stats`` reference file).  Runs of the FID-against-NFE sweep only fill its cells.
* ``table2.md`` / ``.csv``: reconstruction MSE per S, with the paper's row.
* ``fid_vs_nfe.md`` / ``.csv``: every η = 0 FID record, rows sampler, columns the NFE budget (the preset's
  ``fid_vs_nfe.budget``, else the NFE the run spent); a cell reads ``FID @n`` where the run spent n < budget.
* ``fid_vs_steps.png`` (FID against S, one line per η) and ``fid_vs_nfe.png`` (FID against NFE, one line per
  sampler), log-log, the paper's values dashed.
"""
from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import wandb
from matplotlib.figure import Figure

from ddim.diffusion.solvers import SOLVERS, nfe_on
from ddim.evaluation.records import iter_records

TABLE1_STEPS = (10, 20, 50, 100, 1000)
TABLE3_STEPS = (10, 20, 50, 100)
TABLE2_STEPS = (10, 20, 50, 100, 200, 500, 1000)
ODE_KINDS = ("ddim", *SOLVERS)  # the η = 0 samplers of the FID-against-NFE table, in its row order

# Song, Meng & Ermon (2020), arXiv 2010.02502, Table 1: FID (CIFAR-10 32x32 and CelebA 64x64, 50k samples).
PAPER_TABLE1: dict[str, dict[Any, tuple[float, ...]]] = {
    "cifar10": {0.0: (13.36, 6.84, 4.67, 4.16, 4.04), 0.2: (14.04, 7.11, 4.77, 4.25, 4.09),
                0.5: (16.66, 8.35, 5.25, 4.46, 4.29), 1.0: (41.07, 18.36, 8.01, 5.78, 4.73),
                "hat": (367.43, 133.37, 32.72, 9.99, 3.17)},
    "celeba": {0.0: (17.33, 13.73, 9.17, 6.53, 3.51), 0.2: (17.66, 14.11, 9.51, 6.79, 3.64),
               0.5: (19.86, 16.06, 11.01, 8.09, 4.28), 1.0: (33.12, 26.03, 18.48, 13.93, 5.98),
               "hat": (299.71, 183.83, 71.71, 45.20, 3.26)},
}
# Table 3: FID of LSUN Bedroom and Church outdoor (256x256, 50k samples), DDIM (η = 0) and DDPM (η = 1), S = 10, 20,
# 50, 100; keyed like ``Loaded.dataset_key`` without the resolution.  Quoted from memory of the paper, not yet checked
# against its text (arXiv 2010.02502): compare with Table 3 there before citing a gap.
PAPER_TABLE3: dict[str, dict[Any, tuple[float, ...]]] = {
    "lsun-bedroom": {0.0: (16.95, 8.89, 6.75, 6.62), 1.0: (42.78, 22.77, 10.81, 6.81)},
    "lsun-church_outdoor": {0.0: (19.45, 12.47, 10.84, 10.58), 1.0: (51.56, 23.37, 11.16, 8.27)},
}
# Table 2: reconstruction error on the CIFAR-10 test set (per-dimension MSE on [0, 1], rounded to 1e-4).
PAPER_TABLE2: dict[str, tuple[float, ...]] = {"cifar10": (0.014, 0.0065, 0.0023, 0.0009, 0.0004, 0.0001, 0.0001)}
PAPER_RES = {"cifar10": 32, "celeba": 64, "lsun-bedroom": 256, "lsun-church_outdoor": 256}


def _eta_key(eta: Any) -> Any:
    """η as a float; a σ rule named by a string (``hat``, or one added to ``ddim.diffusion.samplers.ETA_STRINGS``)
    as is."""
    return eta if isinstance(eta, str) else float(eta)


def _eta_label(eta: Any, prefix: str = "") -> str:
    return "σ̂" if eta == "hat" else str(eta) if isinstance(eta, str) else f"{prefix}{eta:g}"


def paper_dataset(dataset_key: str) -> str | None:
    """'cifar10-32' -> 'cifar10' when the paper reports that data set at that resolution, else None."""
    name, _, res = dataset_key.rpartition("-")
    return name if name in PAPER_RES and res == str(PAPER_RES[name]) else None


def paper_fid_table(dataset_key: str) -> tuple[dict[Any, tuple[float, ...]], tuple[int, ...]]:
    """The paper's FID rows (η -> values) and their S columns for this data set: Table 1 or Table 3; empty if none."""
    ds = paper_dataset(dataset_key)
    if ds in PAPER_TABLE1:
        return PAPER_TABLE1[ds], TABLE1_STEPS
    if ds in PAPER_TABLE3:
        return PAPER_TABLE3[ds], TABLE3_STEPS
    return {}, ()


def paper_steps(dataset_key: str) -> tuple[int, ...]:
    """The S columns the paper reports FID at for this data set (none where it reports none)."""
    return paper_fid_table(dataset_key)[1]


def paper_fid(dataset_key: str, eta: Any, steps: int) -> float | None:
    table, columns = paper_fid_table(dataset_key)
    if steps not in columns or _eta_key(eta) not in table:
        return None
    return table[_eta_key(eta)][columns.index(steps)]


def paper_mse(dataset_key: str, steps: int) -> float | None:
    ds = paper_dataset(dataset_key)
    if ds not in PAPER_TABLE2 or steps not in TABLE2_STEPS:
        return None
    return PAPER_TABLE2[ds][TABLE2_STEPS.index(steps)]


def real_nfe(kind: str, steps: int, trajectory: str, T: int = 1000) -> int:
    """Network evaluations a run with ``sampler.kind/steps/trajectory`` spends on a T-step model (after the
    trajectory's repeat removal)."""
    return nfe_on(kind, int(steps), T, trajectory)


def _model_label(key: dict, ckpt_names: dict[str, str]) -> str:
    """The model and which of its weights: 'official cifar10, EMA', 'google/ddpm-cifar10-32, not EMA', 'last.ckpt, EMA'
    (FIDs of EMA and raw weights of one model differ several-fold, so tables say which); a checkpoint by the name
    ``ckpt_names`` gives it."""
    m = key.get("model", {})
    if m.get("official"):
        name = f"official {m['official']}"
    elif m.get("pretrained"):
        name = str(m["pretrained"])
    else:
        name = ckpt_names.get(m["ckpt"], Path(m["ckpt"]).name) if "ckpt" in m else "?"
    ema = m.get("use_ema", m.get("ema"))
    return name if ema is None else f"{name}, {'EMA' if ema else 'not EMA'}"


def checkpoint_names(paths: set[str]) -> dict[str, str]:
    """Each checkpoint path's shortest tail that no other path ends in: ``last.ckpt`` when one run is tabulated,
    ``<run>/checkpoints/last.ckpt`` when several runs' checkpoints share a file name (they fell into one cell)."""
    parts = {p: Path(p).parts for p in paths}
    names = {}
    for p, ps in parts.items():
        n = next((n for n in range(1, len(ps)) if all(qs[-n:] != ps[-n:] for q, qs in parts.items() if q != p)),
                 len(ps))
        names[p] = "/".join(ps[-n:])
    return names


def _reference_label(params: dict) -> str | None:
    """The FID reference when it is not the data set's training images: the ``fid.ref_stats`` file (name and start
    of its hash) or another split."""
    ref = params.get("ref_stats")
    if isinstance(ref, dict):
        return f"reference {ref.get('file')} (sha1 {str(ref.get('sha1'))[:8]})"
    split = params.get("ref_split")
    return f"reference {split} split" if split not in (None, "train") else None


def _setting_label(row: dict) -> str:
    """What else sets a result apart: the number of samples, a precision other than fp32, the FID reference."""
    parts = [f"{row['num_samples']} samples"] if row.get("num_samples") else []
    parts += [row["precision"]] if row["precision"] != "fp32" else []
    return ", ".join(parts + ([row["reference"]] if row.get("reference") else []))


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}" if digits else f"{x:.2g}"


def _precision(sampler_key: dict) -> str:
    """The key's precision; records made before sampler.precision say ``fast`` (bf16) and ``fp8`` instead."""
    if sampler_key.get("precision"):
        return sampler_key["precision"]
    return "fp8" if sampler_key.get("fp8") else "bf16" if sampler_key.get("fast") else "fp32"


def _row(r: dict, ckpt_names: dict[str, str]) -> dict | None:
    """One flat row of a FID or reconstruction record, None for other records."""
    k, task, metric = r.get("key", {}), r.get("task"), r.get("metric", {})
    s = k.get("sampler", {})
    kind = s.get("kind", "ddim")
    if task == "fid" and "fid" in metric:
        value, paper = metric["fid"], (paper_fid(k["dataset"], s["eta"], s["steps"]) if kind == "ddim" else None)
    elif task == "reconstruction" and "mse" in metric:
        value, paper = metric["mse"], paper_mse(k["dataset"], s["steps"])
    else:
        return None
    sweep = (r.get("config") or {}).get("fid_vs_nfe") or {}
    spent = r.get("nfe") if task == "fid" and r.get("nfe") else None
    if task == "fid" and spent is None:  # records without the field: computed as evaluate.py does
        spent = real_nfe(kind, s["steps"], s["trajectory"], int(sweep.get("T", 1000)))
    budget = sweep.get("budget")
    # outside the FID-vs-NFE sweep, a run's budget is what S asks for (on linear τ): Table 1's S = 50 on quadratic τ
    # spends 49 of a budget of 50
    nominal = real_nfe(kind, s["steps"], "linear", int(sweep.get("T", 1000))) if task == "fid" else None
    return {"task": task, "dataset": k["dataset"], "model": _model_label(k, ckpt_names), "kind": kind,
            "eta": _eta_key(s["eta"]), "steps": int(s["steps"]), "trajectory": s.get("trajectory"),
            "precision": _precision(s),
            "value": float(value), "paper": paper, "num_samples": r.get("num_samples"), "nfe": spent,
            "reference": _reference_label(k.get("params") or {}) if task == "fid" else None,
            "budget": int(str(budget).removeprefix("nfe")) if budget else nominal, "nfe_sweep": bool(sweep),
            "wall_time_s": r.get("wall_time_s"), "gpu": r.get("device", {}).get("gpu", "cpu"),
            "finished": r.get("finished_at") or ""}


def collect(records_dir: str | Path) -> list[dict]:
    """Flat rows (task, dataset, model, kind, eta, steps, trajectory, precision, value, paper, num_samples, nfe,
    budget, ...) of the FID and reconstruction records, oldest first: where a checkpoint was rewritten and evaluated
    again, the newest result fills the cell."""
    records = list(iter_records(records_dir))
    models = [r.get("key", {}).get("model", {}) for r in records]
    names = checkpoint_names({m["ckpt"] for m in models if "ckpt" in m})
    rows = [row for row in (_row(r, names) for r in records) if row is not None]
    rows.sort(key=lambda row: row["finished"])
    return rows


def group_key(row: dict, fields: tuple[str, ...]) -> tuple:
    return tuple(row[f] for f in fields) + (_setting_label(row),)


def group_rows(rows: list[dict], fields: tuple[str, ...]) -> dict[tuple, list[dict]]:
    """Rows grouped by ``fields`` (plus the setting label), groups in a stable order."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[group_key(r, fields)].append(r)
    return dict(sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))))


TABLE1_FIELDS = ("dataset", "model", "kind", "trajectory")


def table1_rows(fid_rows: list[dict]) -> list[dict]:
    """Table 1's rows: the FID runs outside the FID-against-NFE sweep, and the sweep's runs only where they fill
    a cell of those blocks (the same record answers both sweeps, so a run done by one is skipped by the other;
    the sweep's other S values add no column)."""
    own = [r for r in fid_rows if not r["nfe_sweep"]]
    columns = set()
    for key, rs in group_rows(own, TABLE1_FIELDS).items():
        shown = paper_steps(key[0]) if key[2] == "ddim" else ()
        columns |= {key + (S,) for S in {r["steps"] for r in rs} | set(shown)}
    fill = [r for r in fid_rows if r["nfe_sweep"] and group_key(r, TABLE1_FIELDS) + (r["steps"],) in columns]
    return sorted(own + fill, key=lambda r: r["finished"])


def _title(group: tuple, trajectory_at: int) -> str:
    parts = [str(v) + (" trajectory" if i == trajectory_at else "") for i, v in enumerate(group) if v]
    return ", ".join(parts)


def markdown_table(header: list[Any], body: list[list[Any]]) -> list[str]:
    """A Markdown table's lines: the header row, the rule, one line per body row."""
    return (["| " + " | ".join(map(str, header)) + " |", "|---" * len(header) + "|"]
            + ["| " + " | ".join(map(str, row)) + " |" for row in body])


def write_csv(rows: list[dict], columns: list[str], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


CSV_COLUMNS = ["task", "dataset", "model", "kind", "eta", "steps", "trajectory", "precision", "value", "paper",
               "num_samples", "reference", "wall_time_s", "gpu"]
NFE_CSV_COLUMNS = ["dataset", "model", "trajectory", "precision", "num_samples", "kind", "steps", "nfe", "budget",
                   "value"]


def _order_eta(e: Any) -> tuple:
    """Numbers first, then σ̂, then other σ rules by name."""
    return (0, float(e), "") if not isinstance(e, str) else (1, 0.0, "") if e == "hat" else (2, 0.0, e)


def table1_markdown(rows: list[dict]) -> str:
    """FID blocks in the paper's layout: rows η (σ̂ last), columns S; cells 'ours (paper)' (Table 1, or Table 3 for
    LSUN). The reference is the data set's training images unless the block names another."""
    out = ["# Tables 1 and 3: FID (ours (paper))", ""]
    for group, rs in group_rows(rows, TABLE1_FIELDS).items():
        ds, kind = group[0], group[2]
        steps = sorted({r["steps"] for r in rs} | (set(paper_steps(ds)) if kind == "ddim" else set()))
        cell = {(r["eta"], r["steps"]): r["value"] for r in rs}
        body = []
        for e in sorted({r["eta"] for r in rs}, key=_order_eta):
            cells = []
            for S in steps:
                ours, paper = cell.get((e, S)), paper_fid(ds, e, S) if kind == "ddim" else None
                cells.append(f"{_fmt(ours)} ({_fmt(paper)})" if paper is not None else _fmt(ours))
            body.append([_eta_label(e) if isinstance(e, str) else f"{e:.1f}", *cells])
        out += [f"## {_title(group, 3)}", "", *markdown_table(["η \\ S", *steps], body), ""]
    return "\n".join(out)


def table2_markdown(rows: list[dict]) -> str:
    """Reconstruction MSE per S: one 'ours' row and the paper's row per data set and model."""
    out = ["# Table 2: reconstruction error (per-dimension MSE on [0, 1])", ""]
    for group, rs in group_rows(rows, ("dataset", "model", "trajectory")).items():
        ds = group[0]
        steps = sorted({r["steps"] for r in rs} | (set(TABLE2_STEPS) if paper_dataset(ds) in PAPER_TABLE2 else set()))
        cell = {r["steps"]: r["value"] for r in rs}
        body = [["ours", *(f"{cell[S]:.4g}" if S in cell else "–" for S in steps)]]
        if paper_dataset(ds) in PAPER_TABLE2:
            body.append(["paper", *(f"{paper_mse(ds, S):g}" if paper_mse(ds, S) is not None else "–" for S in steps)])
        out += [f"## {_title(group, 2)}", "", *markdown_table(["S", *steps], body), ""]
    return "\n".join(out)


def _paper_ddim(dataset_key: str) -> list[tuple[int, float]]:
    """The paper's DDIM (η = 0) FID (Table 1 or 3) as (NFE = S, FID) where it reports this data set."""
    pts = [(S, paper_fid(dataset_key, 0.0, S)) for S in paper_steps(dataset_key)]
    return [(S, f) for S, f in pts if f is not None]


def _kinds(rs: list[dict]) -> list[str]:
    return [k for k in ODE_KINDS if any(r["kind"] == k for r in rs)] + sorted({r["kind"] for r in rs} - set(ODE_KINDS))


def nfe_cells(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """(sampler, NFE budget) -> its run: of two runs in one cell (Table 1's S = 50 spends 49 of the budget 50, the
    sweep's S = 51 all 50), the one that spent the most, the newest of equals."""
    cells: dict[tuple[str, int], dict] = {}
    for r in rows:  # oldest first
        if (r["kind"], r["budget"]) not in cells or r["nfe"] >= cells[r["kind"], r["budget"]]["nfe"]:
            cells[r["kind"], r["budget"]] = r
    return cells


def fid_vs_nfe_markdown(rows: list[dict]) -> str:
    """Rows sampler, columns NFE budget; 'FID @n' where the run spent n < budget; the paper's DDIM row."""
    out = ["# FID against NFE (network evaluations); 'FID @n': the run spent n < budget", ""]
    for group, rs in group_rows(rows, ("dataset", "model", "trajectory")).items():
        cell = nfe_cells(rs)
        budgets = sorted({b for _, b in cell})
        body = [[kind, *("–" if (kind, b) not in cell else f"{cell[kind, b]['value']:.2f}"
                         + ("" if cell[kind, b]["nfe"] == b else f" @{cell[kind, b]['nfe']}") for b in budgets)]
                for kind in _kinds(rs)]
        paper = dict(_paper_ddim(group[0]))
        if any(b in paper for b in budgets):
            body.append(["ddim (paper)", *(f"{paper[b]:.2f}" if b in paper else "–" for b in budgets)])
        out += [f"## {_title(group, 2)}", "", *markdown_table(["sampler \\ NFE", *budgets], body), ""]
    return "\n".join(out)


def _plot(groups: dict[tuple, list[dict]], path: Path, xlabel: str, draw: Callable[[Any, tuple, list], None],
          trajectory_at: int) -> Path | None:
    """One log-log FID panel per group, drawn by ``draw(ax, group, rows)``."""
    if not groups:
        return None
    fig = Figure(figsize=(5.5 * len(groups), 4.2))  # drawn without pyplot: no backend, no global state
    axes = fig.subplots(1, len(groups), squeeze=False)
    for ax, (group, rs) in zip(axes[0], groups.items()):
        draw(ax, group, rs)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("FID")
        ax.set_title(_title(group, trajectory_at), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _draw_fid_vs_steps(ax: Any, group: tuple, rs: list[dict]) -> None:
    ds, kind = group[0], group[2]
    for j, e in enumerate(sorted({r["eta"] for r in rs}, key=_order_eta)):
        label = _eta_label(e, "η = ")
        pts = sorted((r["steps"], r["value"]) for r in rs if r["eta"] == e)
        ax.plot(*zip(*pts), "o-", color=f"C{j}", label=f"{label} (ours)")
        paper = [(S, paper_fid(ds, e, S)) for S in paper_steps(ds)] if kind == "ddim" else []
        paper = [p for p in paper if p[1] is not None]
        if paper:
            ax.plot(*zip(*paper), "--", color=f"C{j}", alpha=0.6, label=f"{label} (paper)")


def _draw_fid_vs_nfe(ax: Any, group: tuple, rs: list[dict]) -> None:
    for j, kind in enumerate(_kinds(rs)):
        pts = sorted((r["nfe"], r["value"]) for r in rs if r["kind"] == kind)
        ax.plot(*zip(*pts), "o-", color=f"C{j}", label=kind)
    paper = _paper_ddim(group[0])
    if paper:
        ax.plot(*zip(*paper), "--", color="C0", alpha=0.6, label="ddim (paper)")


def plot_fid_vs_steps(rows: list[dict], path: Path) -> Path | None:
    """FID against S, one colour per η; ours solid with markers, the paper's dashed."""
    return _plot(group_rows(rows, TABLE1_FIELDS), path, "S (sampling steps)",
                 _draw_fid_vs_steps, 3)


def plot_fid_vs_nfe(rows: list[dict], path: Path) -> Path | None:
    """FID against the NFE spent, one line per sampler; the paper's DDIM dashed."""
    return _plot(group_rows(rows, ("dataset", "model", "trajectory")), path, "NFE (network evaluations)",
                 _draw_fid_vs_nfe, 2)


def aggregate(records_dir: str | Path, out_dir: str | Path | None = None, *, wandb_project: str | None = None) -> dict:
    """Write the tables (Markdown + CSV) and the plots; returns their paths and the rows."""
    rows = collect(records_dir)
    out = Path(out_dir) if out_dir is not None else Path(records_dir) / "tables"
    out.mkdir(parents=True, exist_ok=True)
    t1_rows = table1_rows([r for r in rows if r["task"] == "fid"])
    t2_rows = [r for r in rows if r["task"] == "reconstruction"]
    nfe_rows = [r for r in rows if r["task"] == "fid" and r["eta"] == 0.0]
    res: dict[str, Any] = {"rows": rows}
    if t1_rows:
        (out / "table1.md").write_text(table1_markdown(t1_rows))
        res.update(table1_md=out / "table1.md", table1_csv=write_csv(t1_rows, CSV_COLUMNS, out / "table1.csv"),
                   fid_vs_steps_png=plot_fid_vs_steps(t1_rows, out / "fid_vs_steps.png"))
    if t2_rows:
        (out / "table2.md").write_text(table2_markdown(t2_rows))
        res.update(table2_md=out / "table2.md", table2_csv=write_csv(t2_rows, CSV_COLUMNS, out / "table2.csv"))
    if nfe_rows:
        (out / "fid_vs_nfe.md").write_text(fid_vs_nfe_markdown(nfe_rows))
        ordered = sorted(nfe_rows, key=lambda r: tuple(str(r[c]) for c in NFE_CSV_COLUMNS[:5]) + (r["kind"], r["nfe"]))
        res.update(fid_vs_nfe_md=out / "fid_vs_nfe.md",
                   fid_vs_nfe_csv=write_csv(ordered, NFE_CSV_COLUMNS, out / "fid_vs_nfe.csv"),
                   fid_vs_nfe_png=plot_fid_vs_nfe(nfe_rows, out / "fid_vs_nfe.png"))
    if wandb_project and rows:
        _to_wandb(rows, res, wandb_project)
    return res


def _to_wandb(rows: list[dict], res: dict, project: str) -> None:
    cols = ["task", "dataset", "model", "kind", "eta", "steps", "trajectory", "precision", "value", "paper",
            "num_samples", "nfe"]
    run = wandb.init(project=project, job_type="aggregate", name="paper-tables")
    run.log({"results": wandb.Table(columns=cols, data=[[str(r[c]) if c == "eta" else r[c] for c in cols] for r in rows])})
    for name in ("fid_vs_steps", "fid_vs_nfe"):
        if res.get(f"{name}_png"):
            run.log({name: wandb.Image(str(res[f"{name}_png"]))})
    run.finish()


OUTPUTS = ("table1", "table2", "fid_vs_nfe")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("records_dir", nargs="?", default="outputs/records", help="evaluate.py's records (default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: <records_dir>/tables)")
    p.add_argument("--wandb", metavar="PROJECT", default=None, help="also log the table and plots to this W&B project")
    a = p.parse_args(argv)
    if not Path(a.records_dir).is_dir():
        raise SystemExit(f"no records folder: {a.records_dir}")
    res = aggregate(a.records_dir, a.out, wandb_project=a.wandb)
    if not res["rows"]:
        print(f"no FID or reconstruction records under {a.records_dir}")
    for name in OUTPUTS:
        if res.get(f"{name}_md"):
            print(Path(res[f"{name}_md"]).read_text())
    for k in ("table1_csv", "table2_csv", "fid_vs_nfe_csv", "fid_vs_steps_png", "fid_vs_nfe_png"):
        if res.get(k):
            print(f"{k}: {res[k]}")
    return res


if __name__ == "__main__":
    main()
