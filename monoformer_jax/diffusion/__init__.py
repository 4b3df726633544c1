"""Diffusion maths, kept apart from the network (DiT's split): the Gaussian process of the paper
(`gaussian`), flow matching (`flow`), what training draws and scores for each (`process`), and the
samplers with their guidance (`samplers`, `dpm_solver`)."""

from monoformer_jax.diffusion.dpm_solver import TimeSpacing
from monoformer_jax.diffusion.flow import FlowTime
from monoformer_jax.diffusion.gaussian import (
    ddim_step, ddpm_step, discretized_gaussian_log_likelihood, linear_betas, make_schedule,
    normal_kl, p_mean_variance, q_posterior, q_sample, space_timesteps, split_output,
    training_loss)
from monoformer_jax.diffusion.process import Process, Training
from monoformer_jax.diffusion.samplers import (Guidance, GuidanceChannels, Sampler, Solver,
                                               integrate)

__all__ = [
    'FlowTime', 'Guidance', 'GuidanceChannels', 'Process', 'Sampler', 'Solver', 'TimeSpacing',
    'Training', 'ddim_step', 'ddpm_step', 'discretized_gaussian_log_likelihood', 'integrate',
    'linear_betas', 'make_schedule', 'normal_kl', 'p_mean_variance', 'q_posterior', 'q_sample',
    'space_timesteps', 'split_output', 'training_loss']
