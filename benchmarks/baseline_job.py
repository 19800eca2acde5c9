"""The whole-job baseline of `python -m benchmarks --suite job`: a DreamBooth job run the way diffusers'
examples/dreambooth/train_dreambooth.py runs it (stage I of an IF-layout cascade, or a Stable Diffusion 1.x/2.x
model; prior preservation), written as a script of its own so that it runs in its own process, as that script does:

1. Class images, when the class folder holds fewer than --num-class-images: `DiffusionPipeline.from_pretrained`
   (IFPipeline or StableDiffusionPipeline, no safety checker) at the pipeline's defaults (IF stage I: 100 steps,
   guidance 7; Stable Diffusion: the model's scheduler (PNDM for SD 1.x), 50 steps, guidance 7.5, at the UNet's
   sample size times the VAE's factor), prompts in batches of --sample-batch-size (the script's default 4), each
   image saved as `{index}-{sha1}.jpg`; then the pipeline is deleted. A filled folder is used as it is (the
   script's warm start).
2. Loading: the tokenizer (slow, use_fast=False), the text encoder of the class its config names (the script's
   import_model_class_from_model_name_or_path: T5EncoderModel for IF, CLIPTextModel for SD), DDPMScheduler and
   UNet from their subfolders, and the VAE when the model has one (Stable Diffusion; frozen, fp32: the script's
   weight dtype without mixed precision); the instance and class prompts encoded once at 77 tokens and the text
   encoder freed (--pre_compute_text_embeddings; for IF also the attention mask, as diffusers' IF DreamBooth recipe
   passes --text_encoder_use_attention_mask; SD's CLIP encoder runs without one, the script's default).
3. Training: torch.optim.AdamW as the script makes it (betas 0.9/0.999, weight decay 1e-2, eps 1e-8), with torch's
   per-parameter implementation (foreach=False, fused=False: what runs per parameter on a CPU), diffusers'
   get_scheduler, a DataLoader over a dataset that reads and transforms the photos and class images at every
   step (resize, random crop, to tensor, normalise; written with PIL: torchvision is not installed here), shuffled,
   no workers; the step of diffusers_step.py (with the VAE: each step encodes the batch's pixels, at the UNet's
   sample size times the VAE's factor, to a posterior sample); a checkpoint every --checkpointing-steps (the
   script's default 500: `accelerator.save_state` writes the UNet with save_pretrained plus the optimizer and lr
   scheduler states).
4. Writing: `DiffusionPipeline.from_pretrained(model, unet=unet)`, the scheduler's learned variance switched to
   fixed_small, `pipeline.save_pretrained(output)`, as the script ends.

Left out on purpose: accelerate (one process, no mixed precision: it adds nothing but its own overhead), logging
trackers, validation. With --captions each photo has its own prompt (NAME.txt, [V] replaced): the script has one
--instance_prompt; the cost is the same. The seconds of each phase are written as JSON to --timings.

    python -m benchmarks.baseline_job --model DIR --images DIR --class-noun heart --class-dir DIR --output DIR \
        --num-class-images 20 --steps 100 --timings timings.json
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from benchmarks.diffusers_step import diffusers_step

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baseline_job", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="IF-layout cascade directory (stage I is used) or Stable Diffusion 1.x/2.x directory")
    parser.add_argument("--images", required=True, help="the subject photos")
    parser.add_argument("--class-noun", required=True)
    parser.add_argument("--identifier", default="sks", help="the instance prompt's identifier (diffusers' docs: sks)")
    parser.add_argument("--captions", action="store_true", help="each photo's NAME.txt as its prompt ([V]: identifier)")
    parser.add_argument("--class-dir", required=True, help="class images folder (filled when short)")
    parser.add_argument("--num-class-images", type=int, default=100)
    parser.add_argument("--sample-batch-size", type=int, default=4)
    parser.add_argument("--class-sample-steps", type=int, default=None,
                        help="default: the pipeline's (IF: 100, Stable Diffusion: 50)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--lr-schedule", default="constant")
    parser.add_argument("--lr-warmup-steps", type=int, default=0)
    parser.add_argument("--min-snr-gamma", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=1, help="subject rows per step (plus as many prior rows)")
    parser.add_argument("--prior-weight", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--checkpointing-steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (accelerate's device)")
    parser.add_argument("--timings", required=True, help="JSON file for the seconds of each phase")
    return parser.parse_args(argv)


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


@torch.no_grad()
def draw_class_images(args: argparse.Namespace, prompt: str) -> None:
    """The script's class-image phase: only when the folder holds fewer images than asked for."""
    from diffusers import DiffusionPipeline

    class_dir = Path(args.class_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    have = len(list(class_dir.iterdir()))
    if have >= args.num_class_images:
        return
    pipeline = DiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(args.device)
    steps = {"num_inference_steps": args.class_sample_steps} if args.class_sample_steps else {}
    todo = list(range(args.num_class_images - have))
    for first in range(0, len(todo), args.sample_batch_size):
        index = todo[first:first + args.sample_batch_size]
        images = pipeline([prompt] * len(index), **steps).images
        for i, image in zip(index, images):
            digest = hashlib.sha1(image.tobytes()).hexdigest()
            image.save(class_dir / f"{i + have}-{digest}.jpg")
    del pipeline
    gc.collect()


def to_pixels(path: Path, size: int) -> torch.Tensor:
    """The script's image_transforms: Resize(size, bilinear), RandomCrop(size), ToTensor, Normalize([0.5], [0.5])."""
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.BILINEAR)
    left, top = random.randint(0, image.width - size), random.randint(0, image.height - size)
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - 0.5) / 0.5


class DreamBoothDataset(torch.utils.data.Dataset):
    """The script's dataset with pre-computed embeddings: item i is photo i % N and class image i % M, read from
    disk and transformed every time; its length is the larger count."""

    def __init__(self, photos: list[Path], photo_embeds: list[torch.Tensor], class_images: list[Path],
                 class_embeds: torch.Tensor, size: int):
        self.photos, self.photo_embeds, self.class_images = photos, photo_embeds, class_images
        self.class_embeds, self.size = class_embeds, size

    def __len__(self) -> int:
        return max(len(self.photos), len(self.class_images))

    def __getitem__(self, i: int) -> dict:
        return {"subject": to_pixels(self.photos[i % len(self.photos)], self.size),
                "subject_embeds": self.photo_embeds[i % len(self.photos)],
                "prior": to_pixels(self.class_images[i % len(self.class_images)], self.size),
                "prior_embeds": self.class_embeds}


def collate(examples: list[dict]) -> dict:
    return {"subject": torch.stack([e["subject"] for e in examples]),
            "prior": torch.stack([e["prior"] for e in examples]),
            "subject_embeds": torch.cat([e["subject_embeds"] for e in examples]),
            "prior_embeds": torch.cat([e["prior_embeds"] for e in examples])}


def text_encoder_class(model: str):
    """The script's import_model_class_from_model_name_or_path: the class text_encoder/config.json names."""
    import transformers

    config = json.loads((Path(model) / "text_encoder" / "config.json").read_text())
    return getattr(transformers, config["architectures"][0])


@torch.no_grad()
def encode(tokenizer, text_encoder, prompt: str) -> torch.Tensor:
    inputs = tokenizer(prompt, truncation=True, padding="max_length", max_length=77, return_tensors="pt")
    device = text_encoder.device
    # IF's recipe passes --text_encoder_use_attention_mask; SD's command leaves it off (CLIP runs without a mask).
    mask = inputs.attention_mask.to(device) if text_encoder.__class__.__name__ == "T5EncoderModel" else None
    return text_encoder(inputs.input_ids.to(device), attention_mask=mask)[0]


def save_state(unet, optimizer, lr_schedule, folder: Path) -> None:
    """What accelerator.save_state writes with the script's hooks: the UNet, the optimizer, the lr scheduler."""
    unet.save_pretrained(folder / "unet")
    torch.save(optimizer.state_dict(), folder / "optimizer.bin")
    torch.save(lr_schedule.state_dict(), folder / "scheduler.bin")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(timings.get(name, 0.0) + now - clock, 3)
        clock = now

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # the script's set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from transformers import AutoTokenizer

    lap("imports")
    class_prompt = f"a {args.class_noun}"
    draw_class_images(args, class_prompt)
    lap("class_images")

    model, photos = args.model, image_files(Path(args.images))
    tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer", use_fast=False)
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    text_encoder = text_encoder_class(model).from_pretrained(model, subfolder="text_encoder").to(args.device)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(args.device)
    vae = None
    if (Path(model) / "vae").is_dir():  # the script: AutoencoderKL.from_pretrained(...) unless that raises OSError
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae").to(args.device)
        vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    params = list(unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8,
                                  foreach=False, fused=False)
    if args.captions:
        prompts = [p.with_suffix(".txt").read_text().strip().replace("[V]", args.identifier) for p in photos]
    else:
        prompts = [f"a {args.identifier} {args.class_noun}"] * len(photos)
    photo_embeds = [encode(tokenizer, text_encoder, p) for p in prompts]
    class_embeds = encode(tokenizer, text_encoder, class_prompt)
    text_encoder = tokenizer = None
    gc.collect()
    # The script's --resolution: here the model's own (IF: the UNet's size; SD: its latents' times the VAE's factor).
    resolution = unet.config.sample_size * (2 ** (len(vae.config.block_out_channels) - 1) if vae else 1)
    dataset = DreamBoothDataset(photos, photo_embeds, image_files(Path(args.class_dir))[:args.num_class_images],
                                class_embeds, resolution)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                                         num_workers=0)
    lr_schedule = get_scheduler(args.lr_schedule, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                num_training_steps=args.steps)
    lap("load")

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    unet.train()
    step = 0
    for _ in range(math.ceil(args.steps / len(loader))):
        for batch in loader:
            diffusers_step(unet, params, optimizer, lr_schedule, noise_scheduler, None, batch,
                           prior_weight=args.prior_weight, max_grad_norm=args.max_grad_norm,
                           min_snr_gamma=args.min_snr_gamma, vae=vae)
            step += 1
            if step % args.checkpointing_steps == 0:
                save_state(unet, optimizer, lr_schedule, output / f"checkpoint-{step}")
            if step >= args.steps:
                break
    lap("train_base")

    pipeline = DiffusionPipeline.from_pretrained(model, unet=unet, safety_checker=None)
    variance_type = pipeline.scheduler.config.get("variance_type")
    if variance_type in ("learned", "learned_range"):
        pipeline.scheduler = pipeline.scheduler.from_config(pipeline.scheduler.config, variance_type="fixed_small")
    pipeline.save_pretrained(output)
    lap("write")
    Path(args.timings).write_text(json.dumps(timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
