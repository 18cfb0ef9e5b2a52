"""Pure diffusion math of the NAI-v3 recipe: arrays in, arrays out, no Flax, no globals."""
from sdxl_jax.diffusion.guidance import cfg_rescale
from sdxl_jax.diffusion.latents import (NORMALIZATIONS, SDXL_SCALE_FACTOR, denormalize_latents,
                                        normalize_latents)
from sdxl_jax.diffusion.schedule import (SIGMA_INF_STANDIN, ZTSNR_MODES, Schedule, make_schedule,
                                         schedule_from_config, scaled_linear_betas,
                                         ztsnr_rescale_betas)
from sdxl_jax.diffusion.sigmas import (karras_sigmas, sigma_max_for_resolution, sigma_to_t,
                                       t_to_sigma, trailing_sigmas, trailing_timesteps)
from sdxl_jax.diffusion.vpred import (add_noise, predict_eps, predict_x0, snr, v_target,
                                      vp_coefficients)
from sdxl_jax.diffusion.weighting import (HUBER_SCHEDULES, LOSS_TYPES, WEIGHTINGS,
                                          elementwise_loss, huber_threshold, masked_mean,
                                          per_sample_mse, pseudo_huber, snr_loss_weight,
                                          weighted_v_loss)
from sdxl_jax.diffusion.samplers import (SAMPLERS, SCHEDULE_KINDS, make_cfg_model,
                                         make_v_denoiser, sample, sampling_sigmas)
