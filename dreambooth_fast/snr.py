"""Min-SNR-gamma loss weights (Hang et al., 2023) as diffusers computes them (`training_utils.compute_snr` and the
weighting in its training scripts), for the subject rows of a DreamBooth batch.

Pass the subject rows' own timesteps, `timesteps[:n_instance]`: weighting the subject loss with the timesteps of
the whole batch, prior rows included, is diffusers issue 5791. Prior rows carry prior_weight only.
"""

from __future__ import annotations

import torch


def compute_snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alphas_cumprod[t] / (1 - alphas_cumprod[t]) per timestep, float32 on the timesteps' device."""
    alphas_cumprod = alphas_cumprod.to(timesteps.device)
    alpha = (alphas_cumprod**0.5)[timesteps].float()
    sigma = ((1.0 - alphas_cumprod) ** 0.5)[timesteps].float()
    return (alpha / sigma) ** 2


def min_snr_weights(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """Per-sample loss weights min(SNR, gamma) / SNR (epsilon), min(SNR, gamma) / (SNR + 1) (v_prediction) or
    min(SNR, gamma) (sample): the paper's weighting of each prediction type, as diffusers' train_text_to_image.py
    applies it."""
    if gamma <= 0:
        raise ValueError(f"min-SNR gamma must be positive, got {gamma}")
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")
    snr = compute_snr(timesteps, alphas_cumprod)
    if prediction_type == "epsilon":
        # min(SNR, gamma) / SNR written as min(gamma / SNR, 1): the same values, and 1 rather than 0/0 at SNR = 0.
        return (gamma / snr).clamp(max=1.0)
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped
