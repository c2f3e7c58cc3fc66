"""Evaluate a trained ε-model with the DDIM family of samplers: FID, reconstruction, interpolation, consistency, samples.

    python evaluate.py ckpt_path=outputs/train/digits/.../checkpoints/last.ckpt sampler.eta=0 sampler.steps=20
    python evaluate.py official=cifar10 official_path=model-790000.ckpt task=reconstruction sampler.steps=50
    python evaluate.py -m +sweeps=table1_cifar10 official=cifar10 official_path=...   # the paper's Table 1
    python -m ddim.evaluation.aggregate outputs/records                                    # tables + plot
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent


def _add_sweeps_to_search_path(argv: list[str]) -> None:
    """Make ``+sweeps=<preset>`` work from any working directory (the presets live in <repo>/sweeps).

    The override goes next to the user's own overrides (before the first of them, or first of all when there
    are none): Hydra's parser wants the overrides in one run, so an override appended after a trailing
    ``-m`` / ``--cfg job`` / ``--info`` would be rejected."""
    if any(a.startswith("hydra.searchpath") for a in argv):
        return
    first = next((i for i, a in enumerate(argv[1:], 1) if "=" in a and not a.startswith("-")), 1)
    argv.insert(first, f"hydra.searchpath=[file://{ROOT}]")


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from ddim.evaluation.runner import run

    run(cfg)


if __name__ == "__main__":
    _add_sweeps_to_search_path(sys.argv)
    main()
