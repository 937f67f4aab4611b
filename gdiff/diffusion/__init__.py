"""Pure-functional Gaussian diffusion (no TensorFlow, no hidden state); NHWC arrays."""

from gdiff.diffusion.create import create_gaussian_diffusion
from gdiff.diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacedDiffusion,
)
from gdiff.diffusion.guidance import classifier_cond_fn
from gdiff.diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from gdiff.diffusion.schedules import (
    UnknownScheduleError,
    betas_for_alpha_bar,
    get_named_beta_schedule,
    space_timesteps,
)
from gdiff.diffusion.timestep_sampler import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)

__all__ = [
    "GaussianDiffusion",
    "LossSecondMomentResampler",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "SpacedDiffusion",
    "UniformSampler",
    "UnknownScheduleError",
    "approx_standard_normal_cdf",
    "betas_for_alpha_bar",
    "classifier_cond_fn",
    "create_gaussian_diffusion",
    "create_named_schedule_sampler",
    "discretized_gaussian_log_likelihood",
    "get_named_beta_schedule",
    "mean_flat",
    "normal_kl",
    "space_timesteps",
]
