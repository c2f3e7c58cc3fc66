"""FID against the number of network evaluations (NFE): DDIM (η = 0) and the higher-order ODE solvers.

    python evaluate.py -m +sweeps=fid_vs_nfe_cifar10 official=cifar10 official_path=...   # the runs
    python sweeps/fid_vs_nfe.py outputs/records [--out outputs/tables]                  # this table + plot

Reads every FID record with η = 0 (the ODE samplers) that evaluate.py wrote, computes the NFE each run really
spent, ``nfe(kind, len(timesteps(T, S, trajectory)))`` (T from the preset's ``fid_vs_nfe.T``, else 1000), and
writes ``fid_vs_nfe.md`` / ``.csv`` (rows: sampler, columns: NFE budget; a cell reads ``FID`` or ``FID @NFE`` when
the run spent less than the budget) and ``fid_vs_nfe.png`` (FID against NFE, log-log, one line per sampler; the
paper's DDIM η = 0 Table 1 values, where it reports the data set, dashed).
"""
from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path
from typing import Any

KINDS = ("ddim", "plms", "dpmpp_2m", "heun")
BUDGETS = (5, 10, 20, 50, 100)


def real_nfe(kind: str, steps: int, trajectory: str, T: int = 1000) -> int:
    """Network evaluations a run with ``sampler.kind/steps/trajectory`` spent on a T-step model."""
    from ddim.diffusion.solvers import nfe_on

    return nfe_on(kind, int(steps), T, trajectory)


def _model_label(m: dict) -> str:
    if m.get("official"):
        return f"official {m['official']}"
    return Path(m.get("ckpt", "?")).name


def collect(records_dir: str | Path) -> list[dict[str, Any]]:
    """One row per η = 0 FID record: dataset, model, trajectory, kind, steps, nfe, budget, fid."""
    from ddim.evaluation.records import iter_records

    rows = []
    for r in iter_records(records_dir):
        k = r.get("key", {})
        s = k.get("sampler", {})
        if r.get("task") != "fid" or "fid" not in r.get("metric", {}) or str(s.get("eta")) not in ("0", "0.0"):
            continue
        sweep = (r.get("config") or {}).get("fid_vs_nfe") or {}
        kind = s.get("kind", "ddim")
        n = real_nfe(kind, s["steps"], s["trajectory"], int(sweep.get("T", 1000)))
        budget = sweep.get("budget")
        budget = int(str(budget).removeprefix("nfe")) if budget else n
        rows.append({"dataset": k.get("dataset"), "model": _model_label(k.get("model", {})),
                     "trajectory": s["trajectory"], "kind": kind, "steps": int(s["steps"]), "nfe": n,
                     "budget": budget, "fid": float(r["metric"]["fid"]), "num_samples": r.get("num_samples")})
    return rows


def _paper_ddim(dataset: str) -> list[tuple[int, float]]:
    """The paper's Table 1 DDIM (η = 0) FID as (NFE = S, FID) where it reports this data set."""
    from ddim.evaluation.aggregate import TABLE1_STEPS, paper_fid

    pts = [(S, paper_fid(dataset, 0.0, S)) for S in TABLE1_STEPS]
    return [(S, f) for S, f in pts if f is not None]


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    g: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        g[(r["dataset"], r["model"], r["trajectory"])].append(r)
    return dict(sorted(g.items(), key=lambda kv: tuple(map(str, kv[0]))))


def table_markdown(rows: list[dict]) -> str:
    out = ["# FID against NFE (network evaluations); 'FID @n': the run spent n < budget", ""]
    for (ds, model, traj), rs in _groups(rows).items():
        budgets = sorted({r["budget"] for r in rs})
        kinds = [k for k in KINDS if any(r["kind"] == k for r in rs)] + sorted({r["kind"] for r in rs} - set(KINDS))
        cell = {(r["kind"], r["budget"]): r for r in rs}
        out += [f"## {ds}, {model}, {traj} trajectory", "", "| sampler \\ NFE | " + " | ".join(map(str, budgets)) + " |",
                "|---" * (len(budgets) + 1) + "|"]
        for kind in kinds:
            cells = []
            for b in budgets:
                r = cell.get((kind, b))
                cells.append("–" if r is None else f"{r['fid']:.2f}" + ("" if r["nfe"] == b else f" @{r['nfe']}"))
            out.append(f"| {kind} | " + " | ".join(cells) + " |")
        paper = dict(_paper_ddim(ds))
        if paper and any(b in paper for b in budgets):
            out.append("| ddim (paper) | " + " | ".join(f"{paper[b]:.2f}" if b in paper else "–" for b in budgets) + " |")
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> Path | None:
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for ax, ((ds, model, traj), rs) in zip(axes[0], groups.items()):
        for j, kind in enumerate(KINDS + tuple(sorted({r["kind"] for r in rs} - set(KINDS)))):
            pts = sorted((r["nfe"], r["fid"]) for r in rs if r["kind"] == kind)
            if pts:
                ax.plot(*zip(*pts), "o-", color=f"C{j}", label=kind)
        paper = _paper_ddim(ds)
        if paper:
            ax.plot(*zip(*paper), "--", color="C0", alpha=0.6, label="ddim (paper)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE (network evaluations)")
        ax.set_ylabel("FID")
        ax.set_title(f"{ds}: {model} ({traj})", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def aggregate(records_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    rows = collect(records_dir)
    out = Path(out_dir) if out_dir is not None else Path(records_dir) / "tables"
    res: dict[str, Any] = {"rows": rows}
    if not rows:
        return res
    out.mkdir(parents=True, exist_ok=True)
    (out / "fid_vs_nfe.md").write_text(table_markdown(rows))
    cols = ["dataset", "model", "trajectory", "kind", "steps", "nfe", "budget", "fid", "num_samples"]
    with open(out / "fid_vs_nfe.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(sorted(rows, key=lambda r: tuple(str(r[c]) for c in cols[:3]) + (r["kind"], r["nfe"])))
    res.update(md=out / "fid_vs_nfe.md", csv=out / "fid_vs_nfe.csv", plot=plot(rows, out / "fid_vs_nfe.png"))
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("records_dir", nargs="?", default="outputs/records")
    p.add_argument("--out", default=None, help="output folder (default: <records_dir>/tables)")
    a = p.parse_args(argv)
    if not Path(a.records_dir).is_dir():
        raise SystemExit(f"no records folder: {a.records_dir}")
    res = aggregate(a.records_dir, a.out)
    if not res["rows"]:
        print(f"no eta = 0 FID records under {a.records_dir}")
    else:
        print(Path(res["md"]).read_text())
        print(f"csv: {res['csv']}\nplot: {res['plot']}")
    return res


if __name__ == "__main__":
    main()
