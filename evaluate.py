"""Evaluate a trained ε-model with the DDIM family of samplers: FID, reconstruction, interpolation, consistency, samples.

    python evaluate.py sampler.eta=0 sampler.steps=20        # the newest train.py last.ckpt under outputs/train/
    python evaluate.py ckpt_path=outputs/train/digits/.../checkpoints/last.ckpt sampler.eta=0 sampler.steps=20
    python evaluate.py pretrained=cifar10 task=reconstruction sampler.steps=50        # released weights, by name
    python evaluate.py pretrained=google/ddpm-ema-church-256 task=samples            # a diffusers DDPM model
    python evaluate.py official=cifar10 official_path=model-790000.ckpt              # a released file you have
    python evaluate.py -m +sweeps=table1_cifar10 pretrained=cifar10                   # the paper's Table 1
    python -m ddim.evaluation.aggregate outputs/records                                # tables + plots

``+sweeps=<preset>`` finds the presets in ``sweeps/`` from any working directory (the Hydra search-path plugin
``hydra_plugins.ddim_sweeps``, installed with the project).
"""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ddim.evaluation.runner import run

ROOT = Path(__file__).resolve().parent


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
