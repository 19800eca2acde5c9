"""A tiny random cascade in DeepFloyd IF's exact layout, for tests, benchmarks and the CPU quick start.

`build_tiny_cascade(path)` writes a stage I directory (model_index.json, unet/, text_encoder/, tokenizer/,
scheduler/) that diffusers' `IFPipeline.from_pretrained` loads, with a stage II directory in `path/stage_2`
(IF's SR layout: no text encoder, noise-level class labels) that `IFSuperResolutionPipeline` loads. The
weights are random; the SentencePiece tokenizer is trained on captions plus filler text
(`if_layout.tokenizer_text`), so its vocabulary has a frequent head and a rare tail as T5's has.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .if_layout import if_unet_config, save_if_cascade, t5_encoder_config, tokenizer_text, train_sentencepiece


def build_tiny_cascade(
    path: str | Path,
    base_size: int = 32,
    sr_size: int = 64,
    seed: int = 0,
    width: int = 32,
    text_dim: int = 32,
    vocab_size: int = 1000,
    with_stage_2: bool = True,
) -> Path:
    """Write a tiny random IF cascade to `path` (stage I) and `path`/stage_2 (stage II); return `path`."""
    from diffusers import UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    path = Path(path)
    tokenizer_dir = path / "tokenizer"
    train_sentencepiece(tokenizer_dir, tokenizer_text(seed), vocab_size)
    tokenizer = T5Tokenizer.from_pretrained(tokenizer_dir, extra_ids=0)

    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(**t5_encoder_config(len(tokenizer), text_dim, d_kv=8,
                                                               relative_attention_num_buckets=8)))
    # Two levels, ResNet then cross-attention; the text is attended at the first level's width.
    unet = dict(block_out_channels=[width, 2 * width], cross_attention=[False, True], text_dim=text_dim,
                attention_head_dim=8, cross_attention_dim=width)
    base_unet = UNet2DConditionModel(**if_unet_config(base_size, **unet))
    sr_unet = (UNet2DConditionModel(**if_unet_config(sr_size, **unet, super_resolution=True, time_embedding_dim=width))
               if with_stage_2 else None)
    save_if_cascade(path, tokenizer, text_encoder, base_unet, sr_unet)
    return path


if __name__ == "__main__":
    import sys

    print(build_tiny_cascade(sys.argv[1] if len(sys.argv) > 1 else "tiny-cascade"))
