"""A tiny random SDXL base model in diffusers' exact layout, for tests.

`build_tiny_sdxl(path)` writes what `StableDiffusionXLPipeline.save_pretrained` writes (model_index.json, vae/
AutoencoderKL with SDXL's scaling_factor, text_encoder/ CLIPTextModel, text_encoder_2/ CLIPTextModelWithProjection,
tokenizer/ and tokenizer_2/ CLIPTokenizer, unet/ UNet2DConditionModel with SDXL's "text_time" added conditioning,
scheduler/ EulerDiscreteScheduler as SDXL ships it), with random weights. Both tokenizers are the BPE tiny_sd
trains (one vocabulary, as in SDXL); the second pads with "!", as SDXL's tokenizer_2 does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .if_layout import tokenizer_text
from .tiny_sd import SD_BETAS, tiny_unet_config, tiny_vae_config, train_clip_bpe

SDXL_VAE_SCALING = 0.13025  # SDXL's latent scaling factor
TIME_EMBED_DIM = 8  # per time id (SDXL: 256)


def sdxl_scheduler():
    """SDXL base's scheduler: Euler with SD's betas, leading spacing, steps_offset 1."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**SD_BETAS, steps_offset=1, timestep_spacing="leading",
                                  interpolation_type="linear", use_karras_sigmas=False)


def tiny_sdxl_unet_config(latent_size: int, width: int, text_dims: tuple[int, int], pooled_dim: int) -> dict:
    """tiny_sd's UNet with SDXL's added conditioning: the pooled text embedding and 6 time ids (sizes and crop)."""
    return dict(
        tiny_unet_config(latent_size, width, sum(text_dims)),
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=pooled_dim + 6 * TIME_EMBED_DIM, use_linear_projection=True,
    )


def build_tiny_sdxl(path: str | Path, image_size: int = 32, seed: int = 0, width: int = 16,
                    text_dims: tuple[int, int] = (32, 32), pooled_dim: int = 32, n_merges: int = 1000) -> Path:
    """Write a tiny random SDXL base model to `path` (`image_size` px images, 4x smaller latents)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    vocab_dir = train_clip_bpe(path.parent / f".{path.name}-bpe", tokenizer_text(seed), n_merges)
    files = {"vocab": str(vocab_dir / "vocab.json"), "merges": str(vocab_dir / "merges.txt"), "model_max_length": 77}
    tokenizer = CLIPTokenizer(**files)
    tokenizer_2 = CLIPTokenizer(**files, pad_token="!")
    torch.manual_seed(seed)

    def clip_config(hidden: int, **extra) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **extra)

    text_encoder = CLIPTextModel(clip_config(text_dims[0]))
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(text_dims[1], projection_dim=pooled_dim))
    vae = AutoencoderKL(**dict(tiny_vae_config(image_size), scaling_factor=SDXL_VAE_SCALING, force_upcast=True))
    unet = UNet2DConditionModel(**tiny_sdxl_unet_config(image_size // 4, width, text_dims, pooled_dim))
    StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=sdxl_scheduler(), force_zeros_for_empty_prompt=True,
    ).save_pretrained(path, safe_serialization=True)
    return path


if __name__ == "__main__":
    import sys

    print(build_tiny_sdxl(sys.argv[1] if len(sys.argv) > 1 else "tiny-sdxl"))
