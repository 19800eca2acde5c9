"""--train-text-encoder: Stable Diffusion's CLIP text encoder trained together with the base UNet, as diffusers'
train_dreambooth.py (and train_dreambooth_lora.py) offer it; off by default (the paper tunes the UNets alone).

What changes in a run that trains it:
- The prompts are tokenised once (text.clip_tokens) and encoded inside every step, with gradient through the
  encoder; the embeddings are no longer computed once before the loop.
- One Adam over two parameter groups: the UNet's at --learning-rate, the encoder's at --text-encoder-lr (default:
  --learning-rate, as in diffusers); both share the lr schedule and the gradient clipping.
- Full fine-tuning trains every encoder weight and writes the tuned text_encoder/; with --lora-rank a LoRA on the
  encoder's attention projections (q, k, v, out) is saved in the same pytorch_lora_weights.safetensors under the
  `text_encoder.` prefix (with --merge: folded into text_encoder/).
- Checkpoints hold the encoder's weights (keys prefixed `text_encoder.`) beside the UNet's, and Adam's state of
  both groups, so --resume continues bit for bit.
- --prior-mode predictions: the frozen target is the frozen UNet's prediction for the class prompt embedded by the
  *frozen* encoder (the embeddings computed before training, with the input model's encoder); the trained prior
  rows see the class prompt through the encoder being trained.
- Validation grids encode their prompt and the empty prompt with the encoder being trained.

Refused, one line each: DeepFloyd IF (its T5-XXL is 4.7B parameters; the paper tunes only the UNets), SDXL (its two
encoders' packed embedding is computed once before the loop) and a run over several processes (the encoder is not
wrapped in DDP). Only the base stage's text encoder trains: an SR stage
keeps its own, frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import lora
from .config import TrainConfig
from .errors import UserError
from .fileio import atomic_write_dir
from .text import clip_tokens, encode_clip_tokens

PREFIX = lora.TEXT_PREFIX  # the encoder's keys in a checkpoint's weights, as in the LoRA file


def check_family(cfg: TrainConfig, family: str) -> None:
    """Only Stable Diffusion 1.x/2.x trains its text encoder: IF and SDXL are refused before anything is written."""
    if cfg.train_text_encoder and family == "sdxl":
        raise UserError("--train-text-encoder is not supported on SDXL yet (its two text encoders' packed embedding "
                        "is computed once before the loop); drop the option")
    if cfg.train_text_encoder and family != "sd":
        raise UserError("--train-text-encoder is for Stable Diffusion models: DeepFloyd IF's text encoder is T5-XXL "
                        "(4.7B parameters) and the paper tunes only the UNets; drop the option")


def check_input_adapter(model_dir: str | Path) -> None:
    """A run from a --train-text-encoder LoRA output would train on its adapted encoder but write an output without
    that adapter (a new run's adapter file replaces the old one, full fine-tuning deletes it): refused."""
    if lora.has_text_adapter(Path(model_dir)):
        raise UserError(f"--model {model_dir} holds a text-encoder LoRA adapter ({lora.LORA_WEIGHTS} with "
                        "text_encoder. keys), which a new run's output would drop: train from a --merge output of "
                        "that run, or from the original model")


def check_processes(cfg: TrainConfig, world_size: int) -> None:
    """A run over several processes replicates the UNet in DDP; the text encoder is not: refused."""
    if cfg.train_text_encoder and world_size > 1:
        raise UserError(f"--train-text-encoder runs in one process, this run has {world_size} (torchrun, accelerate "
                        "launch or --nproc-per-node): drop --train-text-encoder or run without a launcher")


@dataclass
class TextTraining:
    """The encoder being trained and the prompts it encodes, as token rows (text.clip_tokens)."""

    encoder: torch.nn.Module
    instance: torch.Tensor  # one row per instance prompt
    class_: torch.Tensor  # the class prompt, one row
    validation: torch.Tensor | None  # the validation prompt and the empty prompt
    lora: bool
    lr: float
    params: list[torch.nn.Parameter]

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        return encode_clip_tokens(self.encoder, tokens)

    @torch.no_grad()
    def validation_embeds(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The validation prompt's embeddings (n rows) and the empty prompt's (one row), by the encoder as it is."""
        self.encoder.eval()
        try:
            embeds = self.encode(self.validation)
        finally:
            self.encoder.train()
        return embeds[:1].expand(n, -1, -1), embeds[1:]

    def state(self) -> dict[str, torch.Tensor]:
        """The trained weights (the adapter's with LoRA), keys prefixed `text_encoder.`."""
        weights = lora.adapter_state(self.encoder) if self.lora else self.encoder.state_dict()
        return {PREFIX + k: v for k, v in weights.items()}

    def load_state(self, weights: dict[str, torch.Tensor]) -> None:
        mine = {k[len(PREFIX):]: v for k, v in weights.items() if k.startswith(PREFIX)}
        if not mine:
            raise UserError("the checkpoint holds no text encoder weights: it was not written with "
                            "--train-text-encoder; remove it to restart the stage")
        if self.lora:
            lora.load_adapter_state(self.encoder, mine)
        else:
            self.encoder.load_state_dict(mine)


def split_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's UNet weights: its weights without the text encoder's."""
    return {k: v for k, v in weights.items() if not k.startswith(PREFIX)}


def setup(cfg: TrainConfig, cascade, prompts, validation_prompt: str | None) -> TextTraining | None:
    """Make the cascade's text encoder trainable (full, or a LoRA adapter) and tokenise the run's prompts; None
    when the run does not train it."""
    if not cfg.train_text_encoder:
        return None
    encoder, tokenizer = cascade.text_encoder, cascade.tokenizer
    if cfg.gradient_checkpointing:
        encoder.gradient_checkpointing_enable()
    if cfg.lora_rank:
        params = lora.add_text_lora(encoder, cfg.lora_rank, cfg.seed)
    else:
        params = list(encoder.requires_grad_(True).parameters())
    encoder.train()
    validation = clip_tokens(tokenizer, encoder, [validation_prompt, ""]) if validation_prompt else None
    return TextTraining(
        encoder=encoder,
        instance=clip_tokens(tokenizer, encoder, prompts.instance),
        class_=clip_tokens(tokenizer, encoder, [prompts.class_]),
        validation=validation,
        lora=bool(cfg.lora_rank),
        lr=cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate,
        params=params,
    )


def write_encoder(text: TextTraining, stage_dir: Path) -> None:
    """The tuned encoder as `stage_dir`/text_encoder (full fine-tuning, or LoRA with --merge: folded)."""
    encoder = lora.folded_text_encoder(text.encoder) if text.lora else text.encoder
    atomic_write_dir(stage_dir / "text_encoder", lambda tmp: encoder.save_pretrained(tmp, safe_serialization=True))


def record(cfg: TrainConfig) -> dict:
    """dreambooth.json's "text_encoder": frozen, or trained how and at which learning rate."""
    if not cfg.train_text_encoder:
        return {"trained": False}
    return {"trained": True, "how": "lora" if cfg.lora_rank else "full",
            "learning_rate": cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate}
