"""DeepFloyd IF's diffusers layout, built once: the configs of IF's schedulers, of its UNets (at any width, from
toy size to IF-I-XL's) and of a T5 encoder; a T5-style SentencePiece tokenizer trainer; and the writer of a
cascade (stage I at a path, stage II in its stage_2/), exactly as IF's pipelines save them.

The tiny random cascade, the toy world's pretraining and the benchmarks build their models from here.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterable
from pathlib import Path

from ..models import STAGE_2_DIR

_COLOURS = "red green blue yellow purple orange pink white black brown gray cyan".split()
_SHAPES = "circle square triangle star heart cross ring diamond hexagon moon dog cat".split()
_FILLER = (
    "the quick brown fox jumps over the lazy dog while a photo of a small house stands near the old "
    "river and people walk in the city park under a bright sky with trees flowers cars bikes boats "
    "mountains beaches forests deserts snow rain wind clouds sunsets bridges roads streets windows doors "
    "tables chairs books pens cups plates bottles shoes hats shirts coats phones clocks lamps keys bags"
).split()


def tokenizer_text(seed: int, n_lines: int = 4000) -> list[str]:
    """Text for a SentencePiece vocabulary of T5's shape: captions and filler words (a frequent head) and random
    letter strings (a long tail of rare short pieces), `n_lines` of each kind, seeded."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        lines.append(f"a {rng.choice(_COLOURS)} {rng.choice(_SHAPES)} on a {rng.choice(_COLOURS)} background")
        lines.append(" ".join(rng.choice(_FILLER) for _ in range(rng.randint(6, 16))))
        lines.append(
            " ".join(
                "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 5))) for _ in range(4)
            )
        )
    return lines


def train_sentencepiece(folder: Path, lines: Iterable[str], vocab_size: int) -> Path:
    """Train a T5-style SentencePiece model (unigram; pad=0, eos=1, unk=2, no bos) on `lines`; write it to
    `folder`/spiece.model and return that path."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
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
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    return folder / "spiece.model"


def t5_encoder_config(vocab_size: int, d_model: int, d_kv: int, relative_attention_num_buckets: int) -> dict:
    """A T5Config of T5 v1.1's kind (gated-GELU feed-forward, T5's special ids) at toy depth: 2 layers of 4
    heads, no dropout."""
    return dict(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=relative_attention_num_buckets,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def if_scheduler_config(sample_max_value: float = 1.5) -> dict:
    """The DDPMScheduler config IF ships with its stages (squared-cosine betas, learned-range variance,
    dynamic thresholding); IF's stage I clips at 1.5, stage II at 1.0."""
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


def if_noising_scheduler_config() -> dict:
    """The DDPMScheduler config of IF stage II's image_noising_scheduler (the low-res input's augmentation)."""
    return dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def if_unet_config(sample_size: int, block_out_channels: list[int], cross_attention: list[bool], *, text_dim: int,
                   attention_head_dim: int, super_resolution: bool = False, **overrides) -> dict:
    """A UNet2DConditionModel config of IF's shape: one level per width, a ResNet level or, where
    `cross_attention` says so, a text cross-attention level (the up path mirrors the down path); 6 output
    channels (epsilon + learned-range variance); the T5 embeddings (`text_dim` wide) projected in. Stage II
    (`super_resolution`) adds 3 input channels (the upscaled low-res image) and its noise-augmentation level as
    timestep-embedded class labels. `overrides` set any other UNet2DConditionModel argument."""
    config = dict(
        sample_size=sample_size,
        layers_per_block=1,
        block_out_channels=list(block_out_channels),
        down_block_types=["SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in cross_attention],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=["SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in cross_attention[::-1]],
        in_channels=3,
        out_channels=6,
        cross_attention_dim=block_out_channels[-1],
        encoder_hid_dim=text_dim,
        attention_head_dim=attention_head_dim,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
    )
    if super_resolution:
        config.update(in_channels=6, class_embed_type="timestep", mid_block_scale_factor=1.414,
                      time_embedding_act_fn="gelu")
    config.update(overrides)
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
            image_noising_scheduler=DDPMScheduler(**if_noising_scheduler_config()),
            safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False,
        ).save_pretrained(path / STAGE_2_DIR, safe_serialization=True)
