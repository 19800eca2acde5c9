"""A tiny random Stable Diffusion 1.x/2.x model in diffusers' exact layout, for tests.

`build_tiny_sd(path)` writes what `StableDiffusionPipeline.save_pretrained` writes (model_index.json, vae/
AutoencoderKL, text_encoder/ CLIPTextModel, tokenizer/ CLIPTokenizer, unet/ UNet2DConditionModel, scheduler/),
with random weights. The tokenizer is a byte-level BPE trained here (the `tokenizers` package) on the same
captions, filler and random letter strings as the tiny IF cascade's SentencePiece model, laid out as CLIP's
vocabulary is: the 256 byte characters, the same with the end-of-word mark `</w>`, one entry per merge in merge
order (so later ids are rarer), then <|startoftext|> and <|endoftext|>.

`prediction_type="epsilon"` writes an SD 1.x-style scheduler (PNDM), "v_prediction" an SD 2.x-style one (DDIM).

`build_tiny_upscaler(path)` writes what `StableDiffusionUpscalePipeline.save_pretrained` writes for the x4 upscaler
(stabilityai/stable-diffusion-x4-upscaler's shape at toy width): vae/ (3 levels: 4x), text_encoder/ and tokenizer/
of its own, unet/ taking the 4 latent channels plus the 3 of the low-res image with 1000 class embeddings (the
noise level), scheduler/ (DDIM, v-prediction), low_res_scheduler/ (DDPM) and max_noise_level 350.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .if_layout import tokenizer_text

START, END = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"  # CLIP's end-of-word mark on a word's last piece
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SD_VAE_SCALING = 0.18215  # SD 1.x/2.x's latent scaling factor


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's bytes_to_unicode: the printable character standing for each of the 256 bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def train_clip_bpe(folder: Path, lines: list[str], n_merges: int) -> Path:
    """Train a BPE of about `n_merges` merges on `lines` (lower-cased words, `</w>` on word ends) and write CLIP's
    vocab.json and merges.txt to `folder`; return `folder`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    alphabet = _byte_chars()
    base = alphabet + [c + EOW for c in alphabet]
    bpe = Tokenizer(models.BPE(end_of_word_suffix=EOW))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=len(base) + n_merges, min_frequency=2, show_progress=False,
                                  initial_alphabet=alphabet, end_of_word_suffix=EOW)
    bpe.train_from_iterator(lines, trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    vocab = {piece: i for i, piece in enumerate(base)}
    kept = []
    for left, right in (m if isinstance(m, list) else m.split(" ") for m in merges):
        if left in vocab and right in vocab and left + right not in vocab:
            vocab[left + right] = len(vocab)
            kept.append(f"{left} {right}")
    for special in (START, END):
        vocab[special] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(kept) + "\n")
    return folder


def tiny_unet_config(latent_size: int, width: int, text_dim: int) -> dict:
    """A UNet2DConditionModel of SD's shape (a ResNet level, then a cross-attention level) at toy width."""
    return dict(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=[width, 2 * width], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=text_dim, attention_head_dim=4,
        norm_num_groups=8,
    )


def tiny_vae_config(image_size: int, scaling_factor: float = SD_VAE_SCALING) -> dict:
    """An AutoencoderKL of SD's kind (4 latent channels) with 3 levels: 4x downsampling (SD's is 8x)."""
    return dict(
        sample_size=image_size, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=[8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, norm_num_groups=8, scaling_factor=scaling_factor,
    )


def sd_scheduler(prediction_type: str = "epsilon"):
    """SD 1.x's PNDM scheduler (epsilon) or SD 2.x's DDIM scheduler (v_prediction), with SD's betas."""
    from diffusers import DDIMScheduler, PNDMScheduler

    if prediction_type == "epsilon":
        return PNDMScheduler(**SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    return DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type=prediction_type)


def _clip_text(path: Path, seed: int, text_dim: int, n_merges: int):
    """A CLIP tokenizer trained here and a random CLIPTextModel of width `text_dim` (seeded by `seed`)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab_dir = train_clip_bpe(path.parent / f".{path.name}-bpe", tokenizer_text(seed), n_merges)
    tokenizer = CLIPTokenizer(vocab=str(vocab_dir / "vocab.json"), merges=str(vocab_dir / "merges.txt"),
                              model_max_length=77)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    return tokenizer, text_encoder


def build_tiny_sd(path: str | Path, image_size: int = 32, seed: int = 0, width: int = 16, text_dim: int = 32,
                  n_merges: int = 1000, prediction_type: str = "epsilon") -> Path:
    """Write a tiny random Stable Diffusion model to `path` (`image_size` px images, 4x smaller latents)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    path = Path(path)
    tokenizer, text_encoder = _clip_text(path, seed, text_dim, n_merges)
    vae = AutoencoderKL(**tiny_vae_config(image_size))
    unet = UNet2DConditionModel(**tiny_unet_config(image_size // 4, width, text_dim))
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sd_scheduler(prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(path, safe_serialization=True)
    return path


UPSCALER_VAE_SCALING = 0.08333  # the x4 upscaler's latent scaling factor (StableDiffusionUpscalePipeline insists)
MAX_NOISE_LEVEL = 350  # the x4 upscaler's


def build_tiny_upscaler(path: str | Path, low_res_size: int = 16, seed: int = 1, width: int = 16, text_dim: int = 24,
                        n_merges: int = 1000) -> Path:
    """Write a tiny random x4 upscaler to `path`: `low_res_size` px images in (the UNet's latents are that size),
    4x larger out. Its text encoder is its own (another width than the tiny SD model's, as SD 1.x's CLIP-L is not
    the upscaler's OpenCLIP-H)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )

    path = Path(path)
    tokenizer, text_encoder = _clip_text(path, seed, text_dim, n_merges)
    vae = AutoencoderKL(**tiny_vae_config(4 * low_res_size, UPSCALER_VAE_SCALING))
    unet = UNet2DConditionModel(**{**tiny_unet_config(low_res_size, width, text_dim), "in_channels": 4 + 3,
                                   "num_class_embeds": 1000})
    StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        low_res_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                        beta_schedule="scaled_linear"),
        scheduler=DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                prediction_type="v_prediction"),
        max_noise_level=MAX_NOISE_LEVEL,
    ).save_pretrained(path, safe_serialization=True)
    return path


if __name__ == "__main__":
    import sys

    print(build_tiny_sd(sys.argv[1] if len(sys.argv) > 1 else "tiny-sd"))
