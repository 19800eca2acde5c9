"""A tiny random cascade in DeepFloyd IF's exact layout, for tests, benchmarks and the CPU quick start.

`build_tiny_cascade(path)` writes a stage I directory (model_index.json, unet/, text_encoder/, tokenizer/,
scheduler/) that diffusers' `IFPipeline.from_pretrained` loads, with a stage II directory in `path/stage_2`
(IF's SR layout: no text encoder, noise-level class labels) that `IFSuperResolutionPipeline` loads. The
weights are random; the SentencePiece tokenizer is trained here on toy captions plus filler text, so its
vocabulary has a frequent head and a rare tail as T5's has.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import torch

from ..models import STAGE_2_DIR

_COLOURS = "red green blue yellow purple orange pink white black brown gray cyan".split()
_SHAPES = "circle square triangle star heart cross ring diamond hexagon moon dog cat".split()
_FILLER = (
    "the quick brown fox jumps over the lazy dog while a photo of a small house stands near the old "
    "river and people walk in the city park under a bright sky with trees flowers cars bikes boats "
    "mountains beaches forests deserts snow rain wind clouds sunsets bridges roads streets windows doors "
    "tables chairs books pens cups plates bottles shoes hats shirts coats phones clocks lamps keys bags"
).split()


def training_text(seed: int, n_lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        lines.append(f"a {rng.choice(_COLOURS)} {rng.choice(_SHAPES)} on a {rng.choice(_COLOURS)} background")
        lines.append(" ".join(rng.choice(_FILLER) for _ in range(rng.randint(6, 16))))
        # Random letter strings give the vocabulary a long tail of rare short pieces, as T5's has.
        lines.append(
            " ".join(
                "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 5))) for _ in range(4)
            )
        )
    return lines


def train_sentencepiece(path: Path, vocab_size: int = 1000, seed: int = 0) -> Path:
    """Train a T5-style SentencePiece model (pad=0, eos=1, unk=2) and write it to `path`/spiece.model."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text(seed)),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=1,
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / "spiece.model").write_bytes(buf.getvalue())
    return path / "spiece.model"


def if_scheduler_config(sample_max_value: float = 1.5) -> dict:
    """The DDPMScheduler config IF ships with its stages (squared-cosine betas, learned-range variance,
    dynamic thresholding)."""
    return dict(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        beta_start=0.0001,
        beta_end=0.02,
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=sample_max_value,
        clip_sample=True,
        clip_sample_range=1.0,
        prediction_type="epsilon",
        variance_type="learned_range",
    )


def tiny_unet_config(sample_size: int, super_resolution: bool, width: int = 32, text_dim: int = 32) -> dict:
    """A UNet2DConditionModel config of IF's shape at toy width: 6 output channels (epsilon + learned-range
    variance), text cross-attention; stage II adds 6 input channels (noisy image + upscaled low-res image) and
    the noise-augmentation level as timestep-embedded class labels."""
    config = dict(
        sample_size=sample_size,
        layers_per_block=1,
        block_out_channels=[width, 2 * width],
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
        in_channels=3,
        out_channels=6,
        cross_attention_dim=width,
        encoder_hid_dim=text_dim,
        attention_head_dim=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
    )
    if super_resolution:
        config.update(
            in_channels=6,
            class_embed_type="timestep",
            mid_block_scale_factor=1.414,
            time_embedding_act_fn="gelu",
            time_embedding_dim=width,
        )
    return config


def save_if_cascade(path: Path, tokenizer, text_encoder, base_unet, sr_unet=None,
                    sr_prediction_type: str = "epsilon") -> None:
    """Write stage I (with IF's schedulers) to `path` and, given an SR UNet, stage II to `path`/stage_2, exactly
    as IF's pipelines save them; `sr_prediction_type` is what the SR UNet predicts (IF's: epsilon)."""
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline

    IFPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, unet=base_unet,
        scheduler=DDPMScheduler(**if_scheduler_config(sample_max_value=1.5)),
        safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False,
    ).save_pretrained(path, safe_serialization=True)
    if sr_unet is not None:
        IFSuperResolutionPipeline(
            tokenizer=tokenizer, text_encoder=None, unet=sr_unet,
            scheduler=DDPMScheduler(**{**if_scheduler_config(sample_max_value=1.0),
                                       "prediction_type": sr_prediction_type}),
            image_noising_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
            safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False,
        ).save_pretrained(path / STAGE_2_DIR, safe_serialization=True)


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
    train_sentencepiece(tokenizer_dir, vocab_size=vocab_size, seed=seed)
    tokenizer = T5Tokenizer.from_pretrained(tokenizer_dir, extra_ids=0)

    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=text_dim,
            d_kv=8,
            d_ff=2 * text_dim,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    base_unet = UNet2DConditionModel(**tiny_unet_config(base_size, False, width, text_dim))
    sr_unet = UNet2DConditionModel(**tiny_unet_config(sr_size, True, width, text_dim)) if with_stage_2 else None
    save_if_cascade(path, tokenizer, text_encoder, base_unet, sr_unet)
    return path


if __name__ == "__main__":
    import sys

    print(build_tiny_cascade(sys.argv[1] if len(sys.argv) > 1 else "tiny-cascade"))
