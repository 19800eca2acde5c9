"""SDXL base (StableDiffusionXLPipeline) in diffusers' layout: check, load, its prompts and its UNet's conditioning.

An SDXL directory is what `StableDiffusionXLPipeline.save_pretrained` writes: Stable Diffusion's parts (sd.py) with
two text encoders, text_encoder/ (CLIPTextModel) and text_encoder_2/ (CLIPTextModelWithProjection), each with its
CLIP BPE tokenizer (tokenizer/, tokenizer_2/), and a UNet with SDXL's added conditioning (addition_embed_type
"text_time"): besides the cross-attention tokens it takes the pooled embedding of encoder 2 and six time ids
(original size, crop top-left, target size). It is the base stage of a `models.Cascade` with `family="sdxl"`; the
latent steps (VAE encode and decode, posterior mean times the VAE's scaling_factor, 0.13025 for SDXL) are sd.py's.

Prompts are encoded as `StableDiffusionXLPipeline.encode_prompt` does: both encoders' penultimate hidden states
concatenated, the pooled (projected) output of encoder 2; the empty-prompt negative is zeros when model_index.json
says force_zeros_for_empty_prompt (SDXL base does). Time ids are the pipeline's defaults at the model's own size:
(size, size, 0, 0, size, size).

The engine passes one embedding tensor per prompt around (prompts, class images, guidance, DDP rows, the prior's
predictions); SDXL's pooled embedding and time ids ride in it as one extra token row: `pack` makes
(N, L + 1, D) from the (N, L, D) tokens, with the pooled embedding in the first P columns of the last row and the
time ids in the next 6 (P + 6 <= D: 1286 <= 2048 for SDXL). `unet_kwargs` unpacks it at the UNet call into
`encoder_hidden_states` and `added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}`. The exported UNet
(export/) takes the packed embedding too and unpacks it inside its graph, so its inputs are SD's three
(sample, timestep, encoder_hidden_states of 78 rows) and the ONNX/TensorRT runners serve SDXL unchanged.

The VAE is loaded in float32 whatever the run's dtype, and runs outside autocast (sd.py): SDXL's VAE overflows in
float16 (the pipeline upcasts it too: `force_upcast`).
Not yet: the refiner (StableDiffusionXLImg2ImgPipeline), text-encoder fine-tuning, micro-conditioning other than the
defaults (other original sizes or crops per image).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import sd
from .errors import UserError
from .identifier import check_identifier, describe
from .text import tokenize_clip
from .weights import has_weights

SDXL_PIPELINE = "StableDiffusionXLPipeline"
PARTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
N_TIME_IDS = 6  # original (h, w), crop top-left (y, x), target (h, w)
ENCODER_CLASSES = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}


def check_sdxl_dir(path: Path, index: dict) -> None:
    """Raise a UserError naming what is wrong when `path` (its model_index.json read as `index`) is not a complete
    SDXL base directory: a missing part or weights, no BPE vocabulary, parts that do not fit each other."""
    missing = [p for p in PARTS if not (path / p).is_dir() or index.get(p) in (None, [None, None])]
    if missing:
        raise UserError(f"{path} is not an SDXL ({SDXL_PIPELINE}) directory: missing {', '.join(missing)}")
    for folder in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if not has_weights(path / folder):
            raise UserError(f"no weight files in {path / folder} (expected *.safetensors): the download is incomplete")
    for part, cls in ENCODER_CLASSES.items():
        if index[part][-1] != cls:
            raise UserError(f"{path}/model_index.json names {index[part][-1]} as {part}; SDXL's is {cls}")
    for folder in ("tokenizer", "tokenizer_2"):
        tok = path / folder
        if not (tok / "tokenizer.json").is_file() and not ((tok / "vocab.json").is_file()
                                                           and (tok / "merges.txt").is_file()):
            raise UserError(f"{tok} has no CLIP BPE vocabulary (vocab.json and merges.txt, or tokenizer.json): "
                            "restore it")
    unet = sd._config(path / "unet" / "config.json")
    vae = sd._config(path / "vae" / "config.json")
    text = sd._config(path / "text_encoder" / "config.json")
    text_2 = sd._config(path / "text_encoder_2" / "config.json")
    if unet.get("addition_embed_type") != "text_time":
        raise UserError(f"{path}/unet has addition_embed_type {unet.get('addition_embed_type')!r}, not SDXL's "
                        "'text_time' (pooled text embedding and time ids): the parts are from different models")
    if unet.get("in_channels") != vae.get("latent_channels", 4):
        raise UserError(f"{path}/unet takes {unet.get('in_channels')} input channels but the VAE makes "
                        f"{vae.get('latent_channels', 4)} latent channels: the parts are from different models")
    widths = (text.get("hidden_size"), text_2.get("hidden_size"))
    if unet.get("cross_attention_dim") != sum(w or 0 for w in widths):
        raise UserError(f"{path}/unet attends to {unet.get('cross_attention_dim')}-wide text embeddings but the two "
                        f"text encoders make {widths[0]} + {widths[1]}: the parts are from different models")
    pooled, time_dim = text_2.get("projection_dim") or 0, unet.get("addition_time_embed_dim") or 0
    added = unet.get("projection_class_embeddings_input_dim")
    if added != pooled + N_TIME_IDS * time_dim:
        raise UserError(f"{path}/unet's added conditioning takes {added} numbers but text_encoder_2's pooled "
                        f"{pooled} plus {N_TIME_IDS} time ids x {time_dim} make {pooled + N_TIME_IDS * time_dim}: "
                        "the parts are from different models")
    if pooled + N_TIME_IDS > unet["cross_attention_dim"]:
        raise UserError(f"{path}: a pooled embedding of {pooled} plus {N_TIME_IDS} time ids is wider than the "
                        f"{unet['cross_attention_dim']}-wide text tokens; dbfast carries them in one token row "
                        "(SDXL's 1280 + 6 fit its 2048): this model's shape is not supported")
    scheduler = sd._config(path / "scheduler" / "scheduler_config.json")
    sd._scheduler_class(path, scheduler)
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in sd.PREDICTION_TYPES:
        raise UserError(f"{path}/scheduler predicts {prediction!r}; training serves {', '.join(sd.PREDICTION_TYPES)}")


def check_options(cfg) -> None:
    """The training options that do not apply to an SDXL model, refused before anything is written."""
    if cfg.sr_model is not None or "sr" in (cfg.stages or ()):  # stages None: every stage the model has
        option = "--sr-model" if cfg.sr_model is not None else f"--stages {','.join(cfg.stages)}"
        raise UserError(f"{option}: an SDXL model has no SR stage here (its refiner, StableDiffusionXLImg2ImgPipeline, "
                        "is not supported); train the base stage (--stages base)")
    sd.check_sampler(cfg.class_sampler, "--class-sampler")


def time_ids(size: int) -> list[int]:
    """StableDiffusionXLPipeline's default time ids for `size` px images: original size, crop (0, 0), target size."""
    return [size, size, 0, 0, size, size]


def pack(tokens: torch.Tensor, pooled: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """(N, L, D) tokens, (N, P) pooled embeddings and the 6 time ids -> the (N, L + 1, D) embedding the engine
    passes around: the last row holds the pooled embedding, then the time ids, then zeros."""
    row = tokens.new_zeros(tokens.shape[0], 1, tokens.shape[2])
    row[:, 0, :pooled.shape[1]] = pooled
    row[:, 0, pooled.shape[1]:pooled.shape[1] + N_TIME_IDS] = tokens.new_tensor(ids)
    return torch.cat([tokens, row], dim=1)


def unet_kwargs(config, embeds: torch.Tensor, class_labels: torch.Tensor | None = None) -> dict:
    """A UNet2DConditionModel's conditioning keywords for the engine's `embeds`: encoder_hidden_states and
    class_labels, or for an SDXL UNet (addition_embed_type "text_time") the packed embedding unpacked into the tokens
    and added_cond_kwargs (the pooled embedding and the time ids)."""
    if config.get("addition_embed_type") != "text_time":
        return {"encoder_hidden_states": embeds, "class_labels": class_labels}
    pooled = config["projection_class_embeddings_input_dim"] - N_TIME_IDS * config["addition_time_embed_dim"]
    row = embeds[:, -1]
    return {"encoder_hidden_states": embeds[:, :-1],
            "added_cond_kwargs": {"text_embeds": row[:, :pooled], "time_ids": row[:, pooled:pooled + N_TIME_IDS]}}


class TextEncoders:
    """SDXL's two tokenizers and text encoders, encoding prompts to the packed embedding (text.encode_prompts and
    text.encode_negative hand SDXL's prompts to it)."""

    def __init__(self, tokenizers: tuple, encoders: tuple, size: int, force_zeros: bool):
        self.tokenizers, self.encoders = tokenizers, encoders
        self.time_ids, self.force_zeros = time_ids(size), force_zeros

    @property
    def device(self) -> torch.device:
        return self.encoders[1].device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoders[1].dtype

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """As StableDiffusionXLPipeline.encode_prompt: each tokenizer pads to its model_max_length (77), each
        encoder's penultimate hidden state, concatenated; the pooled output of encoder 2."""
        hidden = []
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            inputs = tokenize_clip(tokenizer, prompts, tokenizer.model_max_length)
            out = encoder(inputs.input_ids.to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        pooled = out[0]  # CLIPTextModelWithProjection's text_embeds
        return pack(torch.cat(hidden, dim=-1), pooled, self.time_ids).to(self.dtype)

    def encode_negative(self, n: int = 1) -> torch.Tensor:
        """The empty prompt's embedding for classifier-free guidance: zeros (with the time ids) when the model says
        force_zeros_for_empty_prompt, as the pipeline does without a negative prompt."""
        embeds = self.encode_prompts([""] * n)
        if self.force_zeros:
            embeds = pack(torch.zeros_like(embeds[:, :-1]), torch.zeros_like(embeds[:, -1, :self.pooled_dim]),
                          self.time_ids)
        return embeds

    @property
    def pooled_dim(self) -> int:
        return self.encoders[1].config.projection_dim


def check_second_tokenizer(text_encoders: TextEncoders, word: str) -> list[str]:
    """The identifier, picked or checked on tokenizer/, must also round-trip in tokenizer_2 as 1-3 pieces (raise a
    UserError if not); a warning when it is other pieces there (SDXL's two tokenizers share one vocabulary)."""
    first, second = text_encoders.tokenizers
    try:
        check_identifier(second, word)
    except UserError as err:
        raise UserError(f"tokenizer_2: {err}") from None
    if describe(first, word) != describe(second, word):
        return [f"identifier {word!r} is {describe(first, word)} in tokenizer/ but {describe(second, word)} in "
                "tokenizer_2: the two encoders see different tokens"]
    return []


def load_sdxl_parts(model_dir: Path, *, device: str, dtype: torch.dtype, with_text_encoder: bool) -> dict:
    """The parts of an SDXL directory models.load_cascade builds its one-stage Cascade from, besides the UNet."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    model_dir = Path(model_dir)
    scale = sd.vae_scale_factor(model_dir)
    text_encoders = None
    if with_text_encoder:
        tokenizers = (sd.load_tokenizer(model_dir),
                      CLIPTokenizer.from_pretrained(model_dir / "tokenizer_2", local_files_only=True))
        encoders = (sd._load_part(CLIPTextModel, model_dir / "text_encoder", device, dtype),
                    sd._load_part(CLIPTextModelWithProjection, model_dir / "text_encoder_2", device, dtype))
        index = json.loads((model_dir / "model_index.json").read_text())
        size = sd._config(model_dir / "unet" / "config.json")["sample_size"] * scale
        text_encoders = TextEncoders(tokenizers, encoders, size, index.get("force_zeros_for_empty_prompt", True))
    return {
        "tokenizer": sd.load_tokenizer(model_dir),
        "text_encoder": text_encoders,
        "base_scheduler": sd.load_scheduler(model_dir),
        "vae": sd._load_part(AutoencoderKL, model_dir / "vae", device, torch.float32),  # fp16 overflows: fp32
        "vae_scale_factor": scale,
    }
