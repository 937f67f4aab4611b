"""`create_gaussian_diffusion`: the reference's `script_util` diffusion factory, same keywords."""

from gdiff.diffusion import gaussian_diffusion as gd
from gdiff.diffusion import schedules


def create_gaussian_diffusion(
    *,
    steps: int = 1000,
    learn_sigma: bool = False,
    sigma_small: bool = False,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    predict_xstart: bool = False,
    rescale_timesteps: bool = False,
    rescale_learned_sigmas: bool = False,
    timestep_respacing: str = "",
) -> gd.SpacedDiffusion:
    """A SpacedDiffusion configured like the reference's flags.

    Loss: RESCALED_KL if use_kl, else RESCALED_MSE if rescale_learned_sigmas, else MSE (the hybrid
    loss when learn_sigma). Mean: START_X if predict_xstart else EPSILON. Variance: LEARNED_RANGE if
    learn_sigma, else FIXED_SMALL if sigma_small, else FIXED_LARGE. An empty `timestep_respacing`
    keeps all `steps` (still a SpacedDiffusion, with the identity timestep_map).
    """
    betas = schedules.get_named_beta_schedule(noise_schedule, steps)
    loss_type = gd.LossType.MSE
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    if not timestep_respacing:
        timestep_respacing = [steps]
    return gd.SpacedDiffusion(
        use_timesteps=schedules.space_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )
