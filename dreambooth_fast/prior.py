"""Class images for prior preservation: generated once by the frozen cascade for "a [class noun]", cached.

The cache directory is keyed by what decides the images (the frozen weights, the prompt, the sampler and its
settings, the seed); `key.json` beside the images records those inputs. Each image is drawn from its own
generator (seeded from the seed and the image's index), so the images do not depend on the batch size or on
who draws them; they are saved as they are made, batch by batch, so an interrupted run resumes where it
stopped and gives the same images as an uninterrupted one. Stage I images are kept at the base resolution (`base/`) and,
when the SR stage is trained, their upscaling by the frozen SR stage at the SR resolution (`sr/`): the SR
stage's prior pairs are (class image at base resolution, its frozen-SR upscaling), so it keeps its general
skill on the class.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import CLASS_IMAGE_BATCH
from .errors import UserError
from .fileio import atomic_write_json, file_lock, sha256_files
from .images import save_pngs
from .models import Cascade, load_unet, weights_files
from .sample import UnetFn, sample_cascade, torch_unet_fn


@dataclass(frozen=True)
class PriorSettings:
    prompt: str
    sampler: str  # samplers.SAMPLERS, for both stages
    base_steps: int
    guidance_scale: float
    sr_steps: int
    sr_guidance_scale: float
    sr_noise_level: int
    with_sr: bool
    seed: int


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dreambooth-fast" / "class-images"


def cache_key(cascade: Cascade, settings: PriorSettings) -> dict:
    """Everything that decides the class images. The dtype and the batch size are left out on purpose: they
    change the images only by rounding, not in distribution. A Stable Diffusion model's VAE decodes them, so its
    files are in the key too (and its scheduler's config, which picks the sampler)."""
    parts = ("vae", "scheduler") if cascade.family == "sd" else ()
    return {
        "base_unet": sha256_files(weights_files(cascade.base_dir)),
        "sr_unet": sha256_files(weights_files(cascade.sr_dir)) if settings.with_sr else None,
        "text_encoder": sha256_files(sorted((cascade.base_dir / "text_encoder").iterdir())),
        **asdict(settings),
        **{part: sha256_files(sorted((cascade.base_dir / part).iterdir())) for part in parts},
    }


def cache_dir_for(key: dict, root: Path) -> Path:
    digest = hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()[:16]
    return root / digest


def _done(folder: Path, n: int) -> int:
    """How many leading images (0000.png, 0001.png, ...) are already there (names as images.save_pngs writes them)."""
    i = 0
    while i < n and (folder / f"{i:04d}.png").is_file():
        i += 1
    return i


@torch.no_grad()
def generate_class_images(
    cascade: Cascade,
    class_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    n: int,
    settings: PriorSettings,
    cache_root: Path | None = None,
    batch_size: int = CLASS_IMAGE_BATCH,
    runners: dict[str, UnetFn] | None = None,
) -> Path:
    """Make sure `n` class images exist in the cache and return their directory (base/ and, with SR, sr/).

    `class_embeds` and `negative_embeds` are one row each (the class prompt and the empty prompt). Images are
    drawn `batch_size` at a time; a batch that does not fit in the device's memory is halved. `runners` ("base"
    and, with SR, "sr": sampler runners of the frozen UNets on any backend) default to the cascade's torch
    UNets. Two runs that need the same class images take turns: the second waits for the first, then draws only
    what is still missing (each PNG is also written atomically, so a reader never sees half an image)."""
    key = cache_key(cascade, settings)
    folder = cache_dir_for(key, cache_root or default_cache_root())
    folders = [folder / "base"] + ([folder / "sr"] if settings.with_sr else [])
    if min(_done(f, n) for f in folders) >= n:
        return folder
    message = f"waiting for another run drawing the same class images into {folder}"
    with file_lock(folder / ".lock", wait=True, on_wait=lambda: tqdm.write(message)):
        _draw_class_images(cascade, class_embeds, negative_embeds, n, settings, key, folder, batch_size, runners)
    return folder


def image_generators(seed: int, first: int, count: int) -> list[torch.Generator]:
    """One generator per class image, seeded from the run's seed and the image's index."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + index) for index in range(first, first + count)]


def _draw_class_images(cascade: Cascade, class_embeds: torch.Tensor, negative_embeds: torch.Tensor, n: int,
                       settings: PriorSettings, key: dict, folder: Path, batch_size: int,
                       runners: dict[str, UnetFn] | None) -> None:
    folders = [folder / "base"] + ([folder / "sr"] if settings.with_sr else [])
    first = min(_done(f, n) for f in folders)
    if first >= n:
        return
    atomic_write_json(folder / "key.json", key)
    unet = cascade.base_unet if cascade.base_unet is not None else cascade.sr_unet
    place = {"device": unet.device, "dtype": unet.dtype}
    if runners is None:
        base_unet = cascade.base_unet
        if base_unet is None:  # an SR-only run: its class images are still stage I's samples, upscaled
            base_unet = load_unet(cascade.base_dir, str(unet.device), unet.dtype)
        runners = {"base": torch_unet_fn(base_unet)}
        if settings.with_sr:
            runners["sr"] = torch_unet_fn(cascade.sr_unet)
    stages = ("base", "sr") if settings.with_sr else ("base",)
    with tqdm(total=n, initial=first, desc=f"class images for {settings.prompt!r}", unit="img") as bar:
        while first < n:
            count = min(batch_size, n - first)
            try:
                images = sample_cascade(cascade, runners, class_embeds.to(**place).expand(count, -1, -1),
                                        negative_embeds.to(**place), stages=stages, base_steps=settings.base_steps,
                                        base_guidance=settings.guidance_scale, sr_steps=settings.sr_steps,
                                        sr_guidance=settings.sr_guidance_scale, noise_level=settings.sr_noise_level,
                                        sampler=settings.sampler,
                                        generator=image_generators(settings.seed, first, count), progress=False)
            except torch.OutOfMemoryError:
                if count == 1:
                    raise UserError("one class image does not fit in the device's memory: pass --precision bf16, "
                                    "or --prior-mode predictions (no class images)") from None
                batch_size = count // 2
                tqdm.write(f"class images: a batch of {count} does not fit in memory; drawing {batch_size} at a time")
                continue
            if settings.with_sr:
                save_pngs(images["sr"], folder / "sr", prefix="", start=first)
            # The base image is written last: an image counts as done once base/ has it.
            save_pngs(images["base"], folder / "base", prefix="", start=first)
            first += count
            bar.update(count)
