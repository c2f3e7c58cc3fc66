"""ddim: Denoising Diffusion Implicit Models (Song, Meng & Ermon, 2020, arXiv 2010.02502).

Layers, each usable without the ones above it:
  ddim.diffusion  pure PyTorch math (schedules, trajectories, samplers, inversion, interpolation)
  ddim.models     the DDPM U-Net and EMA
  ddim.data, ddim.training.module, ddim.evaluation   Lightning data, training module, evaluation
"""

__version__ = "0.1.0"
