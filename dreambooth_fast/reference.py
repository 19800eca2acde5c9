"""The fused ops' math in plain PyTorch, written the way diffusers writes it: the oracle of the native kernels'
tests and the fallback of `ops.py` where no kernel is built for the tensor's device. Same signatures as ops.py.

`add_noise` is `DDPMScheduler.add_noise` (plus `get_velocity` for v_prediction): the table is cast to the sample
dtype, gathered per sample and unsqueezed to the sample's rank. `dreambooth_loss` is the loss of diffusers'
examples/dreambooth/train_dreambooth.py: per-sample `mse_loss(reduction="none")` means times the weights, averaged
over the subject rows, plus `prior_weight` times the mean over the prior rows; computed in float32 (float64 for
float64 inputs) and returned in pred's dtype. `group_norm_act` is the norm -> scale-shift -> activation chain of
diffusers' `ResnetBlock2D`: `norm(h) * (1 + scale) + shift`, then the block's nonlinearity, in x's dtype throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    values = values.flatten()
    while len(values.shape) < ndim:
        values = values.unsqueeze(-1)
    return values


def add_noise(
    x0: torch.Tensor,
    eps: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target): x_t = sqrt(ac[t]) x0 + sqrt(1 - ac[t]) eps; target eps, v = sqrt(ac[t]) eps - sqrt(1 - ac[t]) x0
    or x0 for prediction_type "epsilon", "v_prediction" or "sample"."""
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")
    alphas_cumprod = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)
    timesteps = timesteps.to(x0.device)
    sqrt_alpha_prod = _per_sample(alphas_cumprod[timesteps] ** 0.5, x0.ndim)
    sqrt_one_minus_alpha_prod = _per_sample((1 - alphas_cumprod[timesteps]) ** 0.5, x0.ndim)
    x_t = sqrt_alpha_prod * x0 + sqrt_one_minus_alpha_prod * eps
    if prediction_type == "epsilon":
        return x_t, eps
    if prediction_type == "sample":
        return x_t, x0
    return x_t, sqrt_alpha_prod * eps - sqrt_one_minus_alpha_prod * x0


def dreambooth_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    n_instance: int | None = None,
    prior_weight: float = 1.0,
) -> torch.Tensor:
    """Weighted mean squared error of the subject rows [0, n_instance) plus prior_weight times the mean squared error
    of the remaining (prior) rows; n_instance None means every row is a subject row."""
    return dreambooth_loss_with_parts(pred, target, weights, n_instance, prior_weight)[0]


def dreambooth_loss_with_parts(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    n_instance: int | None = None,
    prior_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, parts): the loss of `dreambooth_loss` and its two terms [subject, prior_weight * prior] (no gradient,
    pred's dtype; the prior term is 0 without prior rows)."""
    n_instance = pred.shape[0] if n_instance is None else n_instance
    if not 1 <= n_instance <= pred.shape[0]:
        raise ValueError(f"n_instance must be in [1, batch = {pred.shape[0]}], got {n_instance}")
    compute_dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    model_pred, model_pred_prior = pred[:n_instance], pred[n_instance:]
    target, target_prior = target[:n_instance], target[n_instance:]
    loss = F.mse_loss(model_pred.to(compute_dtype), target.to(compute_dtype), reduction="none")
    loss = loss.reshape(n_instance, -1).mean(dim=1)  # diffusers: .mean(dim=list(range(1, len(loss.shape))))
    if weights is not None:
        loss = loss * weights
    subject_part = loss.mean()
    loss = subject_part
    prior_part = torch.zeros_like(loss)
    if model_pred_prior.shape[0] > 0:
        prior_loss = F.mse_loss(model_pred_prior.to(compute_dtype), target_prior.to(compute_dtype), reduction="mean")
        prior_part = prior_weight * prior_loss
        loss = loss + prior_part
    return loss.to(pred.dtype), torch.stack([subject_part, prior_part]).detach().to(pred.dtype)


ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "identity": lambda h: h}


def group_norm_act(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    act: str = "gelu",
) -> torch.Tensor:
    """act(group_norm(x) * (1 + scale) + shift) for x [N, C, *]; scale and shift are per (sample, channel), any shape
    of N * C values (diffusers' time embedding chunks are [N, C, 1, 1]); act "gelu" (erf), "silu" or "identity"."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {', '.join(ACTIVATIONS)}, got {act!r}")
    per_channel = (x.shape[0], x.shape[1], *([1] * (x.dim() - 2)))
    hidden = F.group_norm(x, groups, weight, bias, eps)
    if scale is not None:
        hidden = hidden * (1 + scale.reshape(per_channel))
    if shift is not None:
        hidden = hidden + shift.reshape(per_channel)
    return ACTIVATIONS[act](hidden)
