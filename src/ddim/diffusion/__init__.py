"""Pure-PyTorch DDIM math: noise schedules, trajectories τ, the DDIM/DDPM samplers, inversion, slerp."""
from ddim.diffusion.interpolation import slerp
from ddim.diffusion.samplers import encode, sample
# higher-order ODE samplers
from ddim.diffusion.solvers import SOLVERS, Solver, min_nfe, nfe, nfe_on, solve, steps_for_nfe, steps_for_nfe_on
from ddim.diffusion.schedules import BETA_SCHEDULES, alphas_cumprod, alphas_cumprod_from_config, beta_schedule
from ddim.diffusion.trajectories import TRAJECTORIES, timesteps

__all__ = ["BETA_SCHEDULES", "TRAJECTORIES", "alphas_cumprod", "beta_schedule", "encode", "sample", "slerp",
           "timesteps"]
__all__ += ["SOLVERS", "Solver", "min_nfe", "nfe", "solve", "nfe_on", "steps_for_nfe", "steps_for_nfe_on"]
