"""Collect evaluation records into the paper's Table 1 / Table 2 layouts, beside the published numbers.

    python -m ddim.evaluation.aggregate outputs/records [--out outputs/tables] [--wandb]

Writes ``table1.md`` / ``table1.csv`` (FID, rows η, columns S, one block per data set and model),
``table2.md`` / ``table2.csv`` (reconstruction MSE per S) and ``fid_vs_steps.png`` (FID against S, one
line per η; the paper's values dashed). Cells read ``ours (paper)``.
"""
from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from ddim.evaluation.records import iter_records

ETAS = (0.0, 0.2, 0.5, 1.0, "hat")
TABLE1_STEPS = (10, 20, 50, 100, 1000)
TABLE2_STEPS = (10, 20, 50, 100, 200, 500, 1000)

# Song, Meng & Ermon (2020), arXiv 2010.02502, Table 1: FID (CIFAR-10 32x32 and CelebA 64x64, 50k samples).
PAPER_TABLE1: dict[str, dict[Any, tuple[float, ...]]] = {
    "cifar10": {0.0: (13.36, 6.84, 4.67, 4.16, 4.04), 0.2: (14.04, 7.11, 4.77, 4.25, 4.09),
                0.5: (16.66, 8.35, 5.25, 4.46, 4.29), 1.0: (41.07, 18.36, 8.01, 5.78, 4.73),
                "hat": (367.43, 133.37, 32.72, 9.99, 3.17)},
    "celeba": {0.0: (17.33, 13.73, 9.17, 6.53, 3.51), 0.2: (17.66, 14.11, 9.51, 6.79, 3.64),
               0.5: (19.86, 16.06, 11.01, 8.09, 4.28), 1.0: (33.12, 26.03, 18.48, 13.93, 5.98),
               "hat": (299.71, 183.83, 71.71, 45.20, 3.26)},
}
# Table 2: reconstruction error on the CIFAR-10 test set (per-dimension MSE on [0, 1], rounded to 1e-4).
PAPER_TABLE2: dict[str, tuple[float, ...]] = {"cifar10": (0.014, 0.0065, 0.0023, 0.0009, 0.0004, 0.0001, 0.0001)}
PAPER_RES = {"cifar10": 32, "celeba": 64}


def _eta_key(eta: Any) -> Any:
    return "hat" if eta == "hat" else float(eta)


def paper_dataset(dataset_key: str) -> str | None:
    """'cifar10-32' -> 'cifar10' when the paper reports that data set at that resolution, else None."""
    name, _, res = dataset_key.rpartition("-")
    return name if name in PAPER_RES and res == str(PAPER_RES[name]) else None


def paper_fid(dataset_key: str, eta: Any, steps: int) -> float | None:
    ds = paper_dataset(dataset_key)
    if ds is None or steps not in TABLE1_STEPS or _eta_key(eta) not in PAPER_TABLE1[ds]:
        return None
    return PAPER_TABLE1[ds][_eta_key(eta)][TABLE1_STEPS.index(steps)]


def paper_mse(dataset_key: str, steps: int) -> float | None:
    ds = paper_dataset(dataset_key)
    if ds not in PAPER_TABLE2 or steps not in TABLE2_STEPS:
        return None
    return PAPER_TABLE2[ds][TABLE2_STEPS.index(steps)]


def _model_label(key: dict) -> str:
    m = key.get("model", {})
    if m.get("official"):
        return f"official {m['official']}"
    return Path(m.get("ckpt", "?")).name if "ckpt" in m else "?"


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}" if digits else f"{x:.2g}"


def collect(records_dir: str | Path) -> list[dict]:
    """Flat rows (task, dataset, model, kind, eta, steps, trajectory, value, paper, n, wall) from the records."""
    rows = []
    for r in iter_records(records_dir):
        k, task = r.get("key", {}), r.get("task")
        s = k.get("sampler", {})
        if task == "fid" and "fid" in r["metric"]:
            value, paper = r["metric"]["fid"], (paper_fid(k["dataset"], s["eta"], s["steps"]) if s.get("kind") == "ddim" else None)
        elif task == "reconstruction" and "mse" in r["metric"]:
            value, paper = r["metric"]["mse"], paper_mse(k["dataset"], s["steps"])
        else:
            continue
        rows.append({"task": task, "dataset": k["dataset"], "model": _model_label(k), "kind": s.get("kind", "ddim"),
                     "eta": _eta_key(s["eta"]), "steps": int(s["steps"]), "trajectory": s.get("trajectory"),
                     "value": float(value), "paper": paper, "num_samples": r.get("num_samples"),
                     "wall_time_s": r.get("wall_time_s"), "gpu": r.get("device", {}).get("gpu", "cpu"),
                     "_finished": r.get("finished_at") or ""})
    # oldest first, so that where a checkpoint was rewritten and evaluated again the newest result fills the cell
    rows.sort(key=lambda row: row["_finished"])
    for row in rows:
        del row["_finished"]
    return rows


def _write_csv(rows: list[dict], path: Path) -> None:
    cols = ["task", "dataset", "model", "kind", "eta", "steps", "trajectory", "value", "paper", "num_samples",
            "wall_time_s", "gpu"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c) for c in cols})


def _order_eta(e: Any) -> tuple:
    return (1, 0.0) if e == "hat" else (0, float(e))


def table1_markdown(rows: list[dict]) -> str:
    """FID blocks in the paper's layout: rows η (σ̂ last), columns S; cells 'ours (paper)'."""
    out = ["# Table 1: FID (ours (paper))", ""]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["model"], r["kind"], r["trajectory"])].append(r)
    for (ds, model, kind, traj), rs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        steps = sorted({r["steps"] for r in rs} | (set(TABLE1_STEPS) if paper_dataset(ds) and kind == "ddim" else set()))
        etas = sorted({r["eta"] for r in rs}, key=_order_eta)
        cell = {(r["eta"], r["steps"]): r["value"] for r in rs}
        out += [f"## {ds}, {model}, {kind}, {traj} trajectory", "",
                "| η \\ S | " + " | ".join(map(str, steps)) + " |", "|---" * (len(steps) + 1) + "|"]
        for e in etas:
            label = "σ̂" if e == "hat" else f"{e:.1f}"
            cells = []
            for S in steps:
                ours, paper = cell.get((e, S)), paper_fid(ds, e, S) if kind == "ddim" else None
                cells.append(f"{_fmt(ours)} ({_fmt(paper)})" if paper is not None else _fmt(ours))
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def table2_markdown(rows: list[dict]) -> str:
    """Reconstruction MSE per S: one 'ours' row and the paper's row per data set and model."""
    out = ["# Table 2: reconstruction error (per-dimension MSE on [0, 1])", ""]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["model"], r["trajectory"])].append(r)
    for (ds, model, traj), rs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        steps = sorted({r["steps"] for r in rs} | (set(TABLE2_STEPS) if paper_dataset(ds) in PAPER_TABLE2 else set()))
        cell = {r["steps"]: r["value"] for r in rs}
        out += [f"## {ds}, {model}, {traj} trajectory", "", "| S | " + " | ".join(map(str, steps)) + " |",
                "|---" * (len(steps) + 1) + "|",
                "| ours | " + " | ".join(f"{cell[S]:.4g}" if S in cell else "–" for S in steps) + " |"]
        if paper_dataset(ds) in PAPER_TABLE2:
            out.append("| paper | " + " | ".join(f"{paper_mse(ds, S):g}" if paper_mse(ds, S) is not None else "–"
                                               for S in steps) + " |")
        out.append("")
    return "\n".join(out)


def plot_fid_vs_steps(rows: list[dict], path: Path) -> Path | None:
    """FID against S (log-log), one colour per η; ours solid with markers, the paper's dashed."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["model"], r["kind"], r["trajectory"])].append(r)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for ax, ((ds, model, kind, traj), rs) in zip(axes[0], sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0])))):
        etas = sorted({r["eta"] for r in rs}, key=_order_eta)
        for j, e in enumerate(etas):
            color = f"C{j}"
            label = "σ̂" if e == "hat" else f"η = {e:g}"
            pts = sorted((r["steps"], r["value"]) for r in rs if r["eta"] == e)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=f"{label} (ours)")
            paper = [(S, paper_fid(ds, e, S)) for S in TABLE1_STEPS] if kind == "ddim" else []
            paper = [p for p in paper if p[1] is not None]
            if paper:
                ax.plot([p[0] for p in paper], [p[1] for p in paper], "--", color=color, alpha=0.6,
                        label=f"{label} (paper)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("S (sampling steps)")
        ax.set_ylabel("FID")
        ax.set_title(f"{ds}: {model} ({kind}, {traj})", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def aggregate(records_dir: str | Path, out_dir: str | Path | None = None, *, wandb_project: str | None = None) -> dict:
    """Write the tables (Markdown + CSV) and the plot; returns their paths and the rows."""
    rows = collect(records_dir)
    out = Path(out_dir) if out_dir is not None else Path(records_dir) / "tables"
    out.mkdir(parents=True, exist_ok=True)
    fid_rows = [r for r in rows if r["task"] == "fid"]
    rec_rows = [r for r in rows if r["task"] == "reconstruction"]
    res: dict[str, Any] = {"rows": rows}
    if fid_rows:
        (out / "table1.md").write_text(table1_markdown(fid_rows))
        _write_csv(fid_rows, out / "table1.csv")
        res.update(table1_md=out / "table1.md", table1_csv=out / "table1.csv",
                   plot=plot_fid_vs_steps(fid_rows, out / "fid_vs_steps.png"))
    if rec_rows:
        (out / "table2.md").write_text(table2_markdown(rec_rows))
        _write_csv(rec_rows, out / "table2.csv")
        res.update(table2_md=out / "table2.md", table2_csv=out / "table2.csv")
    if wandb_project and rows:
        _to_wandb(rows, res, wandb_project)
    return res


def _to_wandb(rows: list[dict], res: dict, project: str) -> None:
    import wandb

    cols = ["task", "dataset", "model", "kind", "eta", "steps", "trajectory", "value", "paper", "num_samples"]
    run = wandb.init(project=project, job_type="aggregate", name="paper-tables")
    run.log({"results": wandb.Table(columns=cols, data=[[str(r[c]) if c == "eta" else r[c] for c in cols] for r in rows])})
    if res.get("plot"):
        run.log({"fid_vs_steps": wandb.Image(str(res["plot"]))})
    run.finish()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("records_dir", nargs="?", default="outputs/records")
    p.add_argument("--out", default=None, help="output folder (default: <records_dir>/tables)")
    p.add_argument("--wandb", metavar="PROJECT", default=None, help="also log the table and plot to this W&B project")
    a = p.parse_args(argv)
    if not Path(a.records_dir).is_dir():
        raise SystemExit(f"no records folder: {a.records_dir}")
    res = aggregate(a.records_dir, a.out, wandb_project=a.wandb)
    if not res["rows"]:
        print(f"no FID or reconstruction records under {a.records_dir}")
    for k in ("table1_md", "table2_md"):
        if res.get(k):
            print(Path(res[k]).read_text())
    for k in ("table1_csv", "table2_csv", "plot"):
        if res.get(k):
            print(f"{k}: {res[k]}")
    return res


if __name__ == "__main__":
    main()
