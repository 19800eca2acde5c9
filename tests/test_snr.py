"""Min-SNR-gamma weights: diffusers' compute_snr, the paper's weighting per prediction type, computed from the
subject rows' own timesteps (diffusers issue 5791)."""

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr as diffusers_compute_snr

from dreambooth_fast.snr import compute_snr, min_snr_weights


@pytest.fixture(scope="module")
def scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000)


def test_compute_snr_matches_diffusers(scheduler):
    timesteps = torch.tensor([0, 1, 17, 500, 998, 999])
    torch.testing.assert_close(
        compute_snr(timesteps, scheduler.alphas_cumprod), diffusers_compute_snr(scheduler, timesteps)
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_follow_the_paper(scheduler, prediction_type):
    timesteps = torch.tensor([0, 3, 40, 300, 700, 999])
    gamma = 5.0
    snr = diffusers_compute_snr(scheduler, timesteps)
    clipped = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    expected = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[prediction_type]
    weights = min_snr_weights(timesteps, scheduler.alphas_cumprod, gamma, prediction_type)
    assert weights.dtype == torch.float32 and weights.shape == timesteps.shape
    torch.testing.assert_close(weights, expected)


def test_min_snr_weights_are_per_subject_row():
    # Weights come from the timesteps passed in, one per row: the caller passes timesteps[:n_instance].
    ac = torch.linspace(0.9999, 0.0001, 1000)
    timesteps = torch.tensor([5, 900, 5, 900])
    weights = min_snr_weights(timesteps[:2], ac, 5.0)
    assert weights.shape == (2,)
    assert weights[0] < 1.0 and weights[1] == 1.0  # low noise (high SNR) is down-weighted, high noise is not


def test_epsilon_weight_is_one_at_zero_snr():
    ac = torch.tensor([0.5, 0.0])  # a zero-terminal-SNR schedule's last step
    torch.testing.assert_close(min_snr_weights(torch.tensor([1]), ac, 5.0), torch.tensor([1.0]))


def test_min_snr_weights_reject_bad_arguments():
    ac = torch.linspace(0.99, 0.01, 10)
    with pytest.raises(ValueError, match="gamma must be positive"):
        min_snr_weights(torch.tensor([1]), ac, 0.0)
    with pytest.raises(ValueError, match="prediction_type"):
        min_snr_weights(torch.tensor([1]), ac, 5.0, "flow")
