"""Every training option in one dataclass, loadable from a TOML file (`dbfast train --config run.toml`).

Defaults follow the paper where it is explicit (Imagen: lr 1e-5, lambda = 1, ~1000 steps) and diffusers'
DreamBooth script where the paper is silent; the CLI help of each option says which.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .backends import BACKENDS
from .errors import UserError
from .samplers import check_sampler

DIST_TIMEOUT_S = 600  # how long a rank waits for the others in one collective before it stops the run
# Class images per sampler call; halved where it does not fit. 8, not 16: on the CPU 16 per call was at most ~5%
# faster (not in every round) and raised the short job's peak RSS by 17-63 MiB above 8's (README, Performance).
CLASS_IMAGE_BATCH = 8

PRECISIONS = ("fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "linear", "cosine")
STAGES = ("base", "sr")
REPORT_TO = ("none", "tensorboard")  # where metrics go besides OUTPUT/logs/metrics.csv
PRIOR_MODES = ("images", "predictions")  # the paper's class images, or the frozen model's own predictions


@dataclass
class TrainConfig:
    images: str = ""
    class_noun: str = ""
    model: str | None = None
    sr_model: str | None = None
    output: str = "runs/dreambooth"
    stages: tuple[str, ...] | None = None  # None: every stage the model has (an explicit list must all be there)
    identifier: str | None = None
    identifier_tokens: int = 1
    captions: bool = False
    prior_preservation: bool = True
    prior_weight: float = 1.0
    prior_mode: str = "images"
    num_class_images: int = 100
    class_images_dir: str | None = None
    class_sampler: str = "ddpm"
    class_batch_size: int = CLASS_IMAGE_BATCH
    class_backend: str = "torch"
    class_export_dir: str | None = None
    class_sample_steps: int = 25  # judged as good as 50 on the toy model, at half the cost (BENCHMARKS.md)
    class_guidance_scale: float = 7.0
    sr_sample_steps: int = 25
    steps: int = 1000
    sr_steps: int | None = None
    learning_rate: float = 1e-5
    lr_warmup_steps: int = 0
    lr_schedule: str = "constant"
    batch_size: int = 1
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    compile: bool = False
    fused_norm: bool = False
    min_snr_gamma: float | None = None
    lora_rank: int = 0
    merge_lora: bool = False
    train_text_encoder: bool = False  # Stable Diffusion: train the CLIP text encoder with the base UNet
    text_encoder_lr: float | None = None  # None: learning_rate
    use_8bit_adam: bool = False
    sr_noise_level: int = 0
    flip: bool = False
    skip_bad_images: bool = False
    checkpoint_every: int = 250
    validation_prompt: str | None = None
    validation_every: int = 0
    report_to: str = "none"
    seed: int = 0
    device: str = "auto"
    fsdp: bool = False  # under torchrun: shard the UNet over the ranks (FSDP2) instead of replicating it (DDP)
    dist_timeout: int = DIST_TIMEOUT_S

    def validate(self) -> TrainConfig:
        _check_types(self)
        if not self.images:
            raise UserError("--images is required: a directory with 3-5 photos of the subject")
        if not self.class_noun or not self.class_noun.strip():
            raise UserError("--class is required: the subject's class noun, for example --class dog")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        unknown = [s for s in self.stages or () if s not in STAGES]
        if unknown or self.stages is not None and not self.stages:
            raise UserError(
                f"--stages takes a comma list of {', '.join(STAGES)}, got {','.join(self.stages) or '(empty)'}"
            )
        for name in ("steps", "batch_size", "gradient_accumulation", "identifier_tokens", "checkpoint_every",
                     "class_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.identifier_tokens <= 3:
            raise UserError(f"--identifier-tokens must be 1, 2 or 3 (the paper's k), got {self.identifier_tokens}")
        if self.prior_mode not in PRIOR_MODES:
            raise UserError(f"--prior-mode must be one of {', '.join(PRIOR_MODES)}, got {self.prior_mode!r}")
        if self.prior_mode == "predictions" and not self.prior_preservation:
            raise UserError("--prior-mode predictions is a kind of prior preservation: drop --no-prior, or the mode")
        if self.prior_mode == "predictions" and self.class_images_dir:
            raise UserError("--class-images-dir gives class images; --prior-mode predictions uses none: drop one")
        if self.draws_class_images() and self.num_class_images < 1:
            raise UserError("--num-class-images must be at least 1 with prior preservation (or pass --no-prior)")
        check_sampler(self.class_sampler, "--class-sampler")
        if self.class_backend not in BACKENDS:
            raise UserError(f"--class-backend must be one of {', '.join(BACKENDS)}, got {self.class_backend!r}")
        if self.report_to not in REPORT_TO:
            raise UserError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}")
        if self.report_to == "tensorboard":
            _require("tensorboard", "--report-to tensorboard", "tensorboard")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        _check_number("learning_rate", self.learning_rate, "a positive number (the paper: 1e-5)", low=0)
        _check_number("max_grad_norm", self.max_grad_norm, "a positive number (1 is usual)", low=0)
        _check_number("prior_weight", self.prior_weight, "a positive number (the paper's lambda: 1)", low=0)
        _check_number("class_guidance_scale", self.class_guidance_scale, "a number >= 0 (1 or less: no guidance)",
                      low=0, inclusive=True)
        if self.min_snr_gamma is not None:
            _check_number("min_snr_gamma", self.min_snr_gamma, "a positive number (5 is usual)", low=0)
        for name in ("class_sample_steps", "sr_sample_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.sr_steps is not None and self.sr_steps < 1:
            raise UserError(f"--sr-steps must be at least 1, got {self.sr_steps}")
        for name in ("lr_warmup_steps", "validation_every", "num_class_images", "seed"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if self.lora_rank < 0:
            raise UserError(f"--lora-rank must be 0 (full fine-tuning) or positive, got {self.lora_rank}")
        if self.merge_lora and self.lora_rank == 0:
            raise UserError("--merge needs --lora-rank: there is no adapter to merge in full fine-tuning")
        if self.text_encoder_lr is not None:
            if not self.train_text_encoder:
                raise UserError("--text-encoder-lr is the text encoder's learning rate: pass --train-text-encoder too")
            _check_number("text_encoder_lr", self.text_encoder_lr, "a positive number (5e-6 is usual)", low=0)
        if self.train_text_encoder and self.stages is not None and "base" not in self.stages:
            raise UserError("--train-text-encoder trains the base stage's text encoder with its UNet: add base to "
                            f"--stages (got {','.join(self.stages)})")
        if self.use_8bit_adam:
            _require("bitsandbytes", "--use-8bit-adam", "bnb")
        if self.lora_rank:
            _require("peft", "--lora-rank", "lora")
        if self.fsdp and self.lora_rank:
            raise UserError("--fsdp shards full fine-tuning; a LoRA adapter is small enough to replicate: drop --fsdp "
                            "(a distributed run uses DDP by default)")
        if self.fsdp and self.use_8bit_adam:
            raise UserError("--fsdp and --use-8bit-adam do not go together (bitsandbytes' Adam does not take "
                            "sharded parameters): drop one")
        if self.dist_timeout < 1:
            raise UserError(f"--dist-timeout must be at least 1 second, got {self.dist_timeout}")
        if not 0 <= self.sr_noise_level < 1000:
            raise UserError(f"--sr-noise-level must be in [0, 1000), got {self.sr_noise_level}")
        return self

    def draws_class_images(self) -> bool:
        """Whether the run needs the frozen model's class images (its own or the cache's)."""
        return self.prior_preservation and self.prior_mode == "images" and not self.class_images_dir

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["stages"] = list(self.stages) if self.stages is not None else None
        return data


def _check_number(name: str, value: float, what: str, low: float, inclusive: bool = False) -> None:
    """A float option must be finite and above `low` (nan passes every comparison, so test it first)."""
    if not math.isfinite(value) or value < low or (value == low and not inclusive):
        raise UserError(f"--{name.replace('_', '-')} must be {what}, got {value}")


def _check_types(cfg: TrainConfig) -> None:
    """Values from a TOML file arrive untyped: "1e-5" as a string or 3.5 steps must be one clear line."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if value is None or field.name == "stages":
            continue
        kind = {"int": int, "float": float, "bool": bool}.get(field.type.split(" |")[0], str)
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:  # an integer is a fine float
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        if kind is str:  # a path from the Python API
            ok = isinstance(value, str | os.PathLike)
        if not ok:
            raise UserError(f"--{field.name.replace('_', '-')} must be {kind.__name__}, got {value!r}")
    if cfg.stages is not None and (not isinstance(cfg.stages, tuple | list)
                                   or not all(isinstance(s, str) for s in cfg.stages)):
        raise UserError(f"--stages must be a comma list of {', '.join(STAGES)}, got {cfg.stages!r}")


def _require(module: str, option: str, extra: str) -> None:
    """Optional dependencies are checked with the options, before anything is loaded or written."""
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{option} needs {module}: pip install 'dreambooth-fast[{extra}]' (or pip install {module})")


def field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)}


def load_toml(path: str | Path) -> dict:
    """Read a TOML file of TrainConfig fields (dashes or underscores); unknown keys are an error."""
    return options_from_toml(read_toml(path, "--config"), f"--config {path}")


def read_toml(path: str | Path, option: str) -> dict:
    """The TOML file `path` as a dict; a missing or invalid file is one line naming `option`."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{option} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{option} {path} cannot be read ({err})") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{option} {path} is not valid TOML: {err}") from None


def options_from_toml(data: dict, where: str) -> dict:
    """TrainConfig fields from a TOML table: dashes or underscores, `class` for class_noun, `stages` as a comma
    string or a list; an unknown key is an error naming `where`."""
    data = {key.replace("-", "_"): value for key, value in data.items()}
    if "class" in data:
        data["class_noun"] = data.pop("class")
    unknown = sorted(set(data) - field_names())
    if unknown:
        raise UserError(f"{where}: unknown option(s) {', '.join(unknown)}")
    if "stages" in data and isinstance(data["stages"], str):
        data["stages"] = tuple(s.strip() for s in data["stages"].split(","))
    return data
