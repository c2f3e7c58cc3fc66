"""ddim: Denoising Diffusion Implicit Models (Song, Meng & Ermon, 2020, arXiv 2010.02502).

Layers, each usable without the ones above it (imports only downward):
  ddim.diffusion    pure PyTorch math: schedules, trajectories, samplers, ODE solvers, inversion, slerp
  ddim.models       the official U-Net, official-weight loading, EMA
  ddim.accel        the GPU fast path (bf16 / fp8 inference copies, the training network's layers)
  ddim.training     the LightningModule, its objective, the CUDA-graph step, callbacks
  ddim.checkpoints  loading checkpoints for sampling (no Lightning)
  ddim.data         data sets and the LightningDataModule
  ddim.evaluation   validate -> load -> task -> record, FID, the aggregator
train.py and evaluate.py are the Hydra entry points.
"""

__version__ = "0.1.0"
