"""Prompt embeddings exactly as diffusers' `IFPipeline.encode_prompt` computes them (with clean_caption=False),
and for a CLIP tokenizer (Stable Diffusion) as `StableDiffusionPipeline.encode_prompt` does (`encode_clip`); SDXL's
pair of encoders is sdxl.py's.

That means: each prompt lower-cased and stripped (diffusers does this even without caption cleaning, so an
identifier must survive lower-casing), tokenised with padding to `max_length` (77, what IF's T5 was trained
with) and truncation, and the attention mask passed to the encoder. Embeddings come back in the text
encoder's dtype, on its device.
"""

from __future__ import annotations

import warnings

import torch

MAX_LENGTH = 77


def preprocess_prompt(prompt: str) -> str:
    """The text diffusers actually tokenises for `prompt` when caption cleaning is off."""
    return prompt.lower().strip()


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], max_length: int = MAX_LENGTH) -> torch.Tensor:
    """T5 embeddings of `prompts`, shape (len(prompts), max_length, dim); warns when a prompt is truncated.
    A CLIP tokenizer's prompts go to `encode_clip` (its own length: the tokenizer's model_max_length); SDXL's two
    text encoders (sdxl.TextEncoders) encode their own."""
    if hasattr(text_encoder, "encode_prompts"):
        return text_encoder.encode_prompts(prompts)
    if is_clip_tokenizer(tokenizer):
        return encode_clip(tokenizer, text_encoder, prompts)
    texts = [preprocess_prompt(p) for p in prompts]
    inputs = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    for text, ids in zip(texts, tokenizer(texts, add_special_tokens=True).input_ids):
        if len(ids) > max_length:
            removed = tokenizer.decode(ids[max_length - 1:-1])
            warnings.warn(f"prompt {text!r} is longer than {max_length} tokens; this part was cut: {removed!r}",
                          stacklevel=2)
    device = text_encoder.device
    embeds = text_encoder(inputs.input_ids.to(device), attention_mask=inputs.attention_mask.to(device))[0]
    return embeds.to(dtype=text_encoder.dtype)


def is_clip_tokenizer(tokenizer) -> bool:
    """Whether `tokenizer` is CLIP's BPE tokenizer (Stable Diffusion) rather than a T5 SentencePiece one."""
    return type(tokenizer).__name__.startswith("CLIPTokenizer")


@torch.no_grad()
def encode_clip(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """CLIP embeddings as StableDiffusionPipeline computes them: the prompt as given (CLIP's tokenizer lower-cases
    it), padded to the tokenizer's model_max_length (77) and truncated, the attention mask passed only where the
    encoder's config asks for it (use_attention_mask), the last hidden state. Warns when a prompt is truncated.
    A tokenizer saved without model_max_length (transformers then says 1e30) is held to the encoder's positions."""
    return encode_clip_tokens(text_encoder, clip_tokens(tokenizer, text_encoder, prompts, stacklevel=4))


def clip_tokens(tokenizer, text_encoder, prompts: list[str], stacklevel: int = 3) -> torch.Tensor:
    """The token ids and attention masks `encode_clip` feeds the encoder, as one tensor (len(prompts), 2, length):
    [:, 0] the ids, [:, 1] the mask (training the text encoder encodes them again inside each step)."""
    max_length = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)
    inputs = tokenize_clip(tokenizer, prompts, max_length, stacklevel=stacklevel + 1)
    return torch.stack([inputs.input_ids, inputs.attention_mask], dim=1)


def encode_clip_tokens(text_encoder, tokens: torch.Tensor) -> torch.Tensor:
    """The CLIP encoder's last hidden state for `clip_tokens`' rows (with gradient when the encoder trains)."""
    device = text_encoder.device
    ids, mask = tokens[:, 0].to(device), tokens[:, 1].to(device)
    mask = mask if getattr(text_encoder.config, "use_attention_mask", False) else None
    return text_encoder(ids, attention_mask=mask)[0].to(dtype=text_encoder.dtype)


def tokenize_clip(tokenizer, prompts: list[str], max_length: int, stacklevel: int = 4):
    """`prompts` through a CLIP tokenizer as the Stable Diffusion pipelines call it: padded to `max_length` and
    truncated (input_ids and attention_mask); warns when a prompt is truncated."""
    inputs = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    for text, ids in zip(prompts, tokenizer(prompts).input_ids):
        if len(ids) > max_length:
            removed = tokenizer.decode(ids[max_length - 1:-1])
            warnings.warn(f"prompt {text!r} is longer than {max_length} tokens; this part was cut: {removed!r}",
                          stacklevel=stacklevel)
    return inputs


def encode_negative(tokenizer, text_encoder, n: int = 1, max_length: int = MAX_LENGTH) -> torch.Tensor:
    """The unconditional (empty prompt) embedding IF uses for classifier-free guidance, repeated `n` times (SDXL's
    text encoders, sdxl.TextEncoders, make their own)."""
    if hasattr(text_encoder, "encode_negative"):
        return text_encoder.encode_negative(n)
    return encode_prompts(tokenizer, text_encoder, [""] * n, max_length)
