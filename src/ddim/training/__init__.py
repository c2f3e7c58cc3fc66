"""Training of the DDPM ε-model: the LightningModule, its objective, the CUDA-graph step and callbacks."""
