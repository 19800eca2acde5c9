"""Pretrain the embedded default model from scratch on the toy world, in DeepFloyd IF's layout.

    python -m dreambooth_fast.toy.pretrain --out DIR [--steps N] [--resume] [--threads 1]

What is trained, as IF trains its stages, at toy size:
- a SentencePiece tokenizer on the toy captions plus filler text (so rare tokens exist, as in T5's vocabulary);
- a small T5 encoder, pretrained first and then frozen, as IF's T5-XXL is: having no language corpus to
  borrow, it learns to read captions (from its token outputs, linear probes must recover the shape, object
  colour, background colour and pattern each caption names; `pretrain_text_encoder`);
- the 32 px base UNet on the frozen encoder's embeddings, captions dropped 10% of the time for
  classifier-free guidance; from step NAMED_FROM a quarter of the scenes are the world's named things
  ("a bako ring": a made-up word standing for a two-coloured look);
- the 32->64 px SR UNet on the same (detached) text embeddings, its low-res input upsampled and
  noise-augmented to a level drawn uniformly over the noising schedule, the level its class label.
Both UNets predict epsilon in the first half of their 6-channel learned-range output (MSE, min-SNR-5
weighted); the variance half is pulled to -1 (the posterior variance, a fixed-variance choice; IF learns it
with the VLB). From step SR_V_FROM the base UNet is done and the SR UNet alone trains on, predicting v.

Every step draws its batch and noise from (seed, step), so a resumed run is the run that was not stopped. The
checkpoint (DIR/checkpoint.pt, EMA weights included) is written every --checkpoint-every steps; the IF layout
(EMA weights) and DIR/pretrain.json (the cost: steps, wall time, threads, the text encoder's probe accuracy)
are written at the end. To export a stopped run as it is: --resume --steps <its last checkpointed step>.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..fileio import atomic_write, atomic_write_dir, atomic_write_json
from ..models import STAGE_2_DIR
from ..ops import add_noise
from ..snr import min_snr_weights
from ..text import MAX_LENGTH, preprocess_prompt
from . import world
from .if_layout import (
    if_noising_scheduler_config,
    if_scheduler_config,
    if_unet_config,
    save_if_cascade,
    t5_encoder_config,
    tokenizer_text,
    train_sentencepiece,
)

BASE_SIZE = 32
SR_SIZE = 64
TEXT_DIM = 64
VOCAB_SIZE = 1000
CHECKPOINT = "checkpoint.pt"
COST_FILE = "pretrain.json"
MIN_SNR_GAMMA = 5.0
# Named things join the batches once shapes and colours are learnt (the first 11400 steps), as a quarter of
# the scenes: the UNet learns that a rare word can stand for an appearance, as IF's did from web captions.
NAMED_FROM = 11400
NAMED_SHARE = 0.25
# From this step only stage II trains, and on the v target (Salimans & Ho 2022). Trained on epsilon, the toy SR
# UNet read colours from its noisy input and barely from the low-res image: near t = T, where that input holds
# no signal, an epsilon error costs almost nothing, so stage II sampled from pure noise redrew the colours
# (it kept all of stage I in 22% of held-out samples). v carries the image itself at high noise.
SR_V_FROM = 14400
TEXT_STEPS = 400
# What the text encoder's probes read from a caption (`caption_labels`), and their classes.
CAPTION_FIELDS = {"shape": world.SHAPES, "colour": world.COLOURS, "background": world.COLOURS,
                  "pattern": world.PATTERNS}
LAYOUT = ("model_index.json", "unet", "text_encoder", "tokenizer", "scheduler", STAGE_2_DIR)


def text_encoder_config(vocab_size: int) -> dict:
    """The default model's T5 encoder: TEXT_DIM wide."""
    return t5_encoder_config(vocab_size, TEXT_DIM, d_kv=16, relative_attention_num_buckets=16)


def base_unet_config() -> dict:
    """IF-I's block layout at toy size: a ResNet level at 32 px, cross-attention levels at 16 and 8 px."""
    return if_unet_config(BASE_SIZE, [32, 64, 64], [False, True, True], text_dim=TEXT_DIM, attention_head_dim=16,
                          norm_num_groups=8)


def sr_unet_config() -> dict:
    """IF-II's block layout at toy size: ResNet levels at 64 and 32 px, cross-attention at 16 px."""
    return if_unet_config(SR_SIZE, [16, 32, 64], [False, False, True], text_dim=TEXT_DIM, attention_head_dim=16,
                          super_resolution=True, norm_num_groups=8)


def train_tokenizer(folder: Path, seed: int, vocab_size: int = VOCAB_SIZE) -> None:
    """A T5-style SentencePiece model on toy captions plus `if_layout.tokenizer_text` (filler text and a rare tail
    of short pieces, as T5's vocabulary has)."""
    rng = random.Random(seed)
    captions = [world.caption(world.random_scene(rng, train=False), rng) for _ in range(6000)]
    train_sentencepiece(folder, captions + tokenizer_text(seed), vocab_size)


def toy_batch(seed: int, step: int, n: int, drop: float = 0.1, named: float = 0.0) -> tuple[torch.Tensor, list[str]]:
    """Step `step`'s training batch: 64 px images in [-1, 1] and captions ("" with probability `drop`); a share
    `named` of the scenes are named things."""
    rng = random.Random(seed * 1_000_003 + step)
    images, captions = [], []
    for _ in range(n):
        # The roll is drawn only when named things are on, so earlier steps' batches are as they were.
        is_named = named > 0 and rng.random() < named
        scene = world.named_scene(rng) if is_named else world.random_scene(rng)
        images.append(np.asarray(world.render(scene, SR_SIZE)))
        captions.append("" if rng.random() < drop else world.caption(scene, rng))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, captions


def caption_labels(caption: str) -> dict[str, int]:
    """The class index of each CAPTION_FIELDS field `caption` names (-1 where it names none), read from its
    words: the colour before the shape word is the object's, the words after it describe the background."""
    words = caption.split()
    shape_at = next((i for i, w in enumerate(words) if w in world.SHAPES), None)
    if shape_at is None:
        return dict.fromkeys(CAPTION_FIELDS, -1)
    after = words[shape_at + 1:]
    found = {"shape": words[shape_at],
             "colour": words[shape_at - 1] if shape_at and words[shape_at - 1] in world.COLOURS else None,
             "background": next((w for w in after if w in world.COLOURS), None),
             "pattern": next((w for w in after if w in world.PATTERNS), "plain" if "background" in after else None)}
    return {k: CAPTION_FIELDS[k].index(v) if v else -1 for k, v in found.items()}


def pretrain_text_encoder(text_encoder: torch.nn.Module, tokenizer, seed: int, steps: int = TEXT_STEPS,
                          batch: int = 64, lr: float = 3e-3) -> float:
    """Teach the T5 encoder to read toy captions: linear probes on its mean token output must name each field
    of CAPTION_FIELDS the caption mentions (cross-entropy). Returns the probes' accuracy on fresh captions.

    IF's frozen T5-XXL arrives knowing what "red" means; a toy encoder trained only through the diffusion
    loss learnt shape words but no colour words in 5400 steps (an earlier default model: held-out colour right
    16%, the palette's chance is 12.5%; the tokenizer splits colour words into pieces), so it gets this
    reading lesson first."""
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(TEXT_DIM, len(v)) for k, v in CAPTION_FIELDS.items()})
    params = [*text_encoder.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def batch_of(step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rng = random.Random(seed * 1_000_003 + 7_000_000 + step)
        captions = [world.caption(world.random_scene(rng, train=False), rng) for _ in range(batch)]
        tokens = tokenizer([preprocess_prompt(c) for c in captions], padding="max_length", max_length=MAX_LENGTH,
                           truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.float()
        out = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        pooled = (out * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        labels = [caption_labels(c) for c in captions]
        return pooled, {k: torch.tensor([lab[k] for lab in labels]) for k in CAPTION_FIELDS}

    text_encoder.train()
    for step in tqdm(range(steps), desc="text encoder", mininterval=10):
        pooled, labels = batch_of(step)
        loss = sum(F.cross_entropy(heads[k](pooled), y, ignore_index=-1) for k, y in labels.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    with torch.no_grad():
        pooled, labels = batch_of(steps)
        right = [(heads[k](pooled).argmax(-1) == y)[y >= 0] for k, y in labels.items()]
    return float(torch.cat(right).float().mean())


class Models(torch.nn.Module):
    def __init__(self, vocab_size: int):
        from diffusers import UNet2DConditionModel
        from transformers import T5Config, T5EncoderModel

        super().__init__()
        self.text_encoder = T5EncoderModel(T5Config(**text_encoder_config(vocab_size)))
        self.base_unet = UNet2DConditionModel(**base_unet_config())
        self.sr_unet = UNet2DConditionModel(**sr_unet_config())


def sr_target(step: int) -> str:
    """What stage II predicts at training step `step` (at the last step: what its exported scheduler names)."""
    return "epsilon" if step < SR_V_FROM else "v_prediction"


def _prediction_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """MSE of the first half of a 6-channel output against `target` (epsilon or v); the variance half to -1."""
    eps, var = pred[:, :3], pred[:, 3:]
    per_sample = (eps - target).square().mean(dim=(1, 2, 3))
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean() + 0.1 * F.mse_loss(var, torch.full_like(var, -1.0))


def _ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}  # the text encoder: no change
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if name in frozen:
                continue
            if value.dtype.is_floating_point:
                ema[name].lerp_(value, 1 - decay)
            else:
                ema[name].copy_(value)


def export_layout(models: Models, ema: dict[str, torch.Tensor], tokenizer_dir: Path, out: Path,
                  sr_prediction_type: str) -> None:
    """Write the EMA weights in IF's layout into `out` (each component swapped in atomically)."""
    from transformers import T5Tokenizer

    final = copy.deepcopy(models)
    final.load_state_dict(ema)
    tokenizer = T5Tokenizer.from_pretrained(tokenizer_dir, extra_ids=0)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        built = Path(tmp)
        save_if_cascade(built, tokenizer, final.text_encoder, final.base_unet, final.sr_unet, sr_prediction_type)
        for name in LAYOUT:
            if (built / name).is_dir():
                atomic_write_dir(out / name, lambda dst, src=built / name: shutil.copytree(src, dst))
            else:
                atomic_write(out / name, lambda dst, src=built / name: shutil.copyfile(src, dst))


def pretrain(out: str | Path, steps: int = 16400, *, resume: bool = False, seed: int = 0, threads: int = 1,
             base_batch: int = 16, sr_batch: int = 6, lr: float = 8e-4, warmup: int = 200,
             ema_decay: float = 0.995, checkpoint_every: int = 50, min_snr_gamma: float | None = MIN_SNR_GAMMA,
             text_steps: int = TEXT_STEPS) -> Path:
    """Pretrain (or resume) the toy cascade into `out`; return `out`.

    The text encoder is pretrained first (`pretrain_text_encoder`) and frozen. Both stages' losses are
    min-SNR-gamma weighted (Hang et al. 2023): plain epsilon MSE is dominated by the low-noise steps, which
    teach detail, while a toy image's colours and shape (what the caption says, or what the SR stage's low-res
    input shows) are decided at high noise."""
    from transformers import T5Tokenizer

    torch.set_num_threads(threads)
    out = Path(out)
    ckpt_path = out / CHECKPOINT
    if resume and not ckpt_path.is_file():
        raise SystemExit(f"--resume: {ckpt_path} does not exist; start without --resume")
    if not resume and ckpt_path.is_file():
        raise SystemExit(f"{out} already holds a pretraining run: pass --resume to continue it")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = out / "tokenizer"
    if not resume:
        atomic_write_dir(tokenizer_dir, lambda tmp: train_tokenizer(tmp, seed))
    tokenizer = T5Tokenizer.from_pretrained(tokenizer_dir, extra_ids=0)

    torch.manual_seed(seed)
    models = Models(len(tokenizer))
    text_accuracy = None
    if not resume:
        text_accuracy = pretrain_text_encoder(models.text_encoder, tokenizer, seed, text_steps)
    models.text_encoder.requires_grad_(False).eval()
    base_params = list(models.base_unet.parameters())
    opt_base = torch.optim.AdamW(base_params, lr=lr, weight_decay=0.0)
    opt_sr = torch.optim.AdamW(models.sr_unet.parameters(), lr=lr, weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in models.state_dict().items()}
    start, wall, losses = 0, 0.0, {"base": [], "sr": []}
    if resume:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        models.load_state_dict(state["model"])
        ema = state["ema"]
        opt_base.load_state_dict(state["opt_base"])
        opt_sr.load_state_dict(state["opt_sr"])
        start, wall, losses = state["step"], state["wall_s"], state["losses"]
        text_accuracy = state["text_accuracy"]

    base_sched = if_scheduler_config()
    from diffusers import DDPMScheduler

    alphas = DDPMScheduler(**base_sched).alphas_cumprod
    noising = DDPMScheduler(**if_noising_scheduler_config()).alphas_cumprod

    def save(step: int, elapsed: float) -> None:
        state = {"model": models.state_dict(), "ema": ema, "opt_base": opt_base.state_dict(),
                 "opt_sr": opt_sr.state_dict(), "step": step, "wall_s": elapsed, "losses": losses,
                 "text_accuracy": text_accuracy}
        atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))

    models.base_unet.train()
    models.sr_unet.train()
    t0 = time.time() - wall
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="pretrain", mininterval=10)
    for step in bar:
        for group in (*opt_base.param_groups, *opt_sr.param_groups):
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        x64, captions = toy_batch(seed, step, base_batch, named=NAMED_SHARE if step >= NAMED_FROM else 0.0)
        x32 = F.interpolate(x64, (BASE_SIZE, BASE_SIZE), mode="area")
        tokens = tokenizer([preprocess_prompt(c) for c in captions], padding="max_length", max_length=MAX_LENGTH,
                           truncation=True, return_tensors="pt")
        with torch.no_grad():
            embeds = models.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]

        base_on = step < SR_V_FROM
        models.base_unet.requires_grad_(base_on)  # frozen, its EMA weights stay too (_ema_update)
        if base_on:
            t = torch.randint(0, len(alphas), (base_batch,), generator=gen)
            noisy, target = add_noise(x32, torch.randn(x32.shape, generator=gen), t, alphas)
            weights = min_snr_weights(t, alphas, min_snr_gamma) if min_snr_gamma else None
            base_loss = _prediction_loss(models.base_unet(noisy, t, encoder_hidden_states=embeds).sample, target,
                                         weights)
            opt_base.zero_grad(set_to_none=True)
            base_loss.backward()
            torch.nn.utils.clip_grad_norm_(base_params, 1.0)
            opt_base.step()
            losses["base"].append(round(base_loss.item(), 5))

        # SR: the first rows of the same batch, low-res upsampled as IF's pipeline does, then noise-augmented.
        hi = x64[:sr_batch]
        low = F.interpolate(x32[:sr_batch], (SR_SIZE, SR_SIZE), mode="bilinear", align_corners=True)
        levels = torch.randint(0, len(noising), (sr_batch,), generator=gen)
        low, _ = add_noise(low, torch.randn(low.shape, generator=gen), levels, noising)
        t = torch.randint(0, len(alphas), (sr_batch,), generator=gen)
        target_type = sr_target(step)
        noisy, target = add_noise(hi, torch.randn(hi.shape, generator=gen), t, alphas, target_type)
        pred = models.sr_unet(torch.cat([noisy, low], 1), t, encoder_hidden_states=embeds[:sr_batch],
                              class_labels=levels).sample
        weights = min_snr_weights(t, alphas, min_snr_gamma, target_type) if min_snr_gamma else None
        sr_loss = _prediction_loss(pred, target, weights)
        opt_sr.zero_grad(set_to_none=True)
        sr_loss.backward()
        torch.nn.utils.clip_grad_norm_(models.sr_unet.parameters(), 1.0)
        opt_sr.step()

        _ema_update(ema, models, min(ema_decay, (1 + step) / (10 + step)))
        losses["sr"].append(round(sr_loss.item(), 5))
        if (step + 1) % 10 == 0:
            bar.set_postfix(base=f"{np.mean(losses['base'][-50:]):.4f}", sr=f"{np.mean(losses['sr'][-50:]):.4f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            save(step + 1, time.time() - t0)
    bar.close()
    wall = time.time() - t0 if steps > start else wall

    export_layout(models, ema, tokenizer_dir, out, sr_target(steps - 1))
    n_params = {name: sum(p.numel() for p in module.parameters()) for name, module in models.named_children()}
    atomic_write_json(out / COST_FILE, {
        "steps": steps, "wall_s": round(wall, 1), "threads": threads, "device": "cpu",
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "seed": seed,
        "base_batch": base_batch, "sr_batch": sr_batch, "lr": lr, "warmup": warmup, "ema_decay": ema_decay,
        "loss": f"epsilon MSE (both stages), min-SNR-{min_snr_gamma} weighted; from step {SR_V_FROM} stage II "
                f"alone, v MSE",
        "text_encoder": {"steps": text_steps, "probe_accuracy": text_accuracy},
        "parameters": n_params, "torch": torch.__version__,
        "final_loss": {k: round(float(np.mean(v[-100:])), 5) for k, v in losses.items() if v},
        "command": f"python -m dreambooth_fast.toy.pretrain --out {out} --steps {steps} --threads {threads}",
    })
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory (IF layout + checkpoint.pt + pretrain.json)")
    parser.add_argument("--steps", type=int, default=16400, help="UNet steps (the shipped run: see its pretrain.json)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--base-batch", type=int, default=16)
    parser.add_argument("--sr-batch", type=int, default=6)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--min-snr-gamma", type=float, default=MIN_SNR_GAMMA, help="loss weighting (0: off)")
    parser.add_argument("--text-steps", type=int, default=TEXT_STEPS, help="text encoder pretraining steps")
    args = parser.parse_args(argv)
    pretrain(args.out, args.steps, resume=args.resume, seed=args.seed, threads=args.threads,
             base_batch=args.base_batch, sr_batch=args.sr_batch, checkpoint_every=args.checkpoint_every,
             min_snr_gamma=args.min_snr_gamma or None, text_steps=args.text_steps)


if __name__ == "__main__":
    main()
