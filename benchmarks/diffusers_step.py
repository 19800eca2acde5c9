"""One DreamBooth training step written the way diffusers' examples/dreambooth/train_dreambooth.py writes it: the
eager baseline of the training-step suite (bench_train) and of the whole-job baseline (baseline_job).

torch.cat of the subject and prior rows, `DDPMScheduler.add_noise`, the UNet, torch.chunk of the prediction
(epsilon / learned variance, then subject / prior) and of the target, two F.mse_loss calls (the subject one
per sample and weighted with min-SNR-gamma when asked, as the script's --snr_gamma does), prior_loss_weight,
autograd, clip_grad_norm_, optimizer and lr step. Gradients are freed with zero_grad(set_to_none=True) (the
script zero-fills them by default; that difference is not the project's to claim). The SR stage adds the
noise-augmented upscaled low-res image as 3 more input channels and its level as the class label.

Only torch and diffusers are imported here: the baseline job's process must not pay for importing the project.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusers_step(unet: torch.nn.Module, params: list, optimizer: torch.optim.Optimizer, lr_schedule, scheduler,
                   noising, batch: dict, *, prior_weight: float, max_grad_norm: float, sr_noise_level: int = 0,
                   autocast: torch.dtype | None = None, min_snr_gamma: float | None = None, vae=None) -> float:
    """One optimizer step on `batch` ({subject, prior: images, or latents; subject_embeds, prior_embeds: text
    embeddings; subject_cond, prior_cond: the SR stage's upscaled low-res images or None}); returns the loss.
    `vae`: the batch holds pixels, encoded to a posterior sample every step (Stable Diffusion)."""
    device = params[0].device
    model_input = torch.cat([batch["subject"], batch["prior"]]).to(device)
    if vae is not None:  # the script's VAE is frozen (requires_grad False) and in the weights' dtype
        model_input = vae.encode(model_input.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
    embeds = torch.cat([batch["subject_embeds"], batch["prior_embeds"]]).to(device)
    noise = torch.randn_like(model_input)
    bsz = model_input.shape[0]
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), device=device).long()
    noisy_model_input = scheduler.add_noise(model_input, noise, timesteps)
    class_labels = None
    if batch.get("subject_cond") is not None:
        cond = torch.cat([batch["subject_cond"], batch["prior_cond"]]).to(device)
        class_labels = torch.full((bsz,), sr_noise_level, dtype=torch.long, device=device)
        noisy_cond = noising.add_noise(cond, torch.randn_like(cond), class_labels)
        noisy_model_input = torch.cat([noisy_model_input, noisy_cond], dim=1)
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        model_pred = unet(noisy_model_input, timesteps, embeds, class_labels=class_labels, return_dict=False)[0]
    if model_pred.shape[1] == 6:
        model_pred, _ = torch.chunk(model_pred, 2, dim=1)  # epsilon, learned variance
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(model_input, noise, timesteps)
    else:
        target = noise
    model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
    target, target_prior = torch.chunk(target, 2, dim=0)
    prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
    if min_snr_gamma is None:
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    else:
        from diffusers.training_utils import compute_snr

        # The subject rows' own timesteps (the script takes all rows' and broadcasts: diffusers issue 5791).
        snr = compute_snr(scheduler, timesteps[: model_pred.shape[0]])
        weights = torch.clamp(snr, max=min_snr_gamma) / snr
        if scheduler.config.prediction_type == "v_prediction":  # the script's weights for a velocity target
            weights = weights + 1
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
        loss = (loss.mean(dim=list(range(1, len(loss.shape)))) * weights).mean()
    loss = loss + prior_weight * prior_loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    lr_schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach().item()
