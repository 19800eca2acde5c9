"""Named samplers for the cascade's stages: which scheduler steps the denoising loop and over which timesteps.

- "ddpm": the model's own scheduler (IF ships DDPM with a learned variance) over N evenly spaced steps: what the
  IF pipelines do by default (stage I 100 steps, stage II 50).
- "dpm++": DPM-Solver++ (multistep, 2nd order; diffusers' DPMSolverMultistepScheduler) built from the model's
  scheduler config, so the same noise schedule, prediction type and dynamic thresholding, over N steps. It drops
  the learned-variance half of the UNet's output, as the DDPM loop does not.
- DeepFloyd's timestep presets for IF ("fast27", "smart27", "smart50", "smart100", "smart185", "super27",
  "super40", "super100"): hand-picked subsets of the 1000 DDPM steps that the IF pipelines take as `timesteps`
  (diffusers' pipelines/deepfloyd_if/timesteps.py). They fix the step count; N is not used.
"""

from __future__ import annotations

from .errors import UserError

IF_PRESETS = ("fast27", "smart27", "smart50", "smart100", "smart185", "super27", "super40", "super100")
SAMPLERS = ("ddpm", "dpm++", *IF_PRESETS)


def check_sampler(sampler: str, option: str = "--sampler") -> None:
    if sampler not in SAMPLERS:
        raise UserError(f"{option} {sampler!r}: choose one of {', '.join(SAMPLERS)}")


def sampler_schedule(scheduler, sampler: str) -> tuple[object, list[int] | None]:
    """The scheduler to step with and, for a preset, its timesteps (None: the step count decides)."""
    check_sampler(sampler)
    if sampler == "ddpm":
        return scheduler, None
    if sampler == "dpm++":
        from diffusers import DPMSolverMultistepScheduler

        # linspace spacing ends at t = 0 whatever N is ("leading", IF's DDPM setting, stops short at few steps).
        return DPMSolverMultistepScheduler.from_config(scheduler.config, algorithm_type="dpmsolver++", solver_order=2,
                                                       timestep_spacing="linspace"), None
    n_train = scheduler.config.num_train_timesteps
    if n_train != 1000:
        raise UserError(f"sampler {sampler!r} is one of IF's presets for 1000-step schedules; this model's scheduler "
                        f"has {n_train} steps: use ddpm or dpm++")
    from diffusers.pipelines.deepfloyd_if import timesteps

    return scheduler, list(getattr(timesteps, f"{sampler}_timesteps"))

