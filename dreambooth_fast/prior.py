"""Class images for prior preservation: generated once by the frozen cascade for "a [class noun]", cached.

The cache directory is keyed by what decides the images (the frozen weights, the prompt, the sampler and its
settings, the seed); `key.json` beside the images records those inputs. Each image is drawn from its own
generator (seeded from the seed and the image's index), so the images do not depend on the batch size or on
who draws them; they are saved as they are made, batch by batch, so an interrupted run resumes where it
stopped and gives the same images as an uninterrupted one. The batches are claimed one by one (an flock per
batch), so processes that need the same images (the ranks of a distributed run, two runs) share the drawing
and never draw an image twice. Stage I images are kept at the base resolution (`base/`) and,
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
from .images import save_png, to_pil
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


DIGEST_MEMO = "weight-digests.json"  # in the cache root: the model files' digests by their stat (fileio.sha256_files)


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dreambooth-fast" / "class-images"


def cache_key(cascade: Cascade, settings: PriorSettings, memo: Path | None = None) -> dict:
    """Everything that decides the class images. The dtype and the batch size are left out on purpose: they
    change the images only by rounding, not in distribution. A Stable Diffusion model's VAE decodes them, so its
    files are in the key too (and its scheduler's config, which picks the sampler), SDXL's second text encoder and
    model_index.json (its force_zeros_for_empty_prompt decides the negative embedding), and the x4 upscaler's own
    VAE, text encoder and schedulers when it draws the SR stage's. `memo`: where the weights' digests are
    remembered between runs (fileio.sha256_files)."""
    parts = ("vae", "scheduler") if cascade.latent else ()
    parts += ("text_encoder_2",) if cascade.family == "sdxl" else ()
    sr_parts = ("vae", "text_encoder", "scheduler", "low_res_scheduler") if cascade.family == "sd" else ()

    def digest(paths: list[Path]) -> str:
        return sha256_files(paths, memo)

    index = {"model_index": digest([cascade.base_dir / "model_index.json"])} if cascade.family == "sdxl" else {}
    return {
        "base_unet": digest(weights_files(cascade.base_dir)),
        "sr_unet": digest(weights_files(cascade.sr_dir)) if settings.with_sr else None,
        "text_encoder": digest(sorted((cascade.base_dir / "text_encoder").iterdir())),
        **asdict(settings),
        **{part: digest(sorted((cascade.base_dir / part).iterdir())) for part in parts},
        **{f"sr_{part}": digest(sorted((cascade.sr_dir / part).iterdir())) for part in sr_parts if settings.with_sr},
        **index,
    }


def cache_dir_for(key: dict, root: Path) -> Path:
    digest = hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()[:16]
    return root / digest


def _missing(folders: list[Path], indices: range | list[int]) -> list[int]:
    """The class images of `indices` (each saved as NNNN.png, its index) not yet in every folder."""
    return [i for i in indices if not all((f / f"{i:04d}.png").is_file() for f in folders)]


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
    share: tuple[int, int] = (0, 1),
    sr_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[Path, int]:
    """Make sure `n` class images exist in the cache; return their directory (base/ and, with SR, sr/) and how
    many of them this process drew.

    `class_embeds` and `negative_embeds` are one row each (the class prompt and the empty prompt). The images
    are split into batches of `batch_size` by index (batch k: images k*batch_size ...); a batch that does not
    fit in the device's memory is halved. Whoever draws a batch holds a claim on it (an flock, released by the
    OS if the process dies), so processes that need the same class images share the work and never draw an
    image twice: the ranks of one run (`share` = (rank, world size): rank r starts with the batches k = r mod
    world size, then helps with the rest), or two runs at once. Then each waits until every batch is there,
    drawing any batch whose claimant died. `runners` ("base" and, with SR, "sr": sampler runners of the frozen
    UNets on any backend) default to the cascade's torch UNets. Each PNG is written atomically, so a reader
    never sees half an image. `sr_embeds` (class prompt, empty prompt): the Stable Diffusion x4 upscaler's own;
    it upscales the base image brought to its input size (the pairs the SR stage trains on)."""
    root = cache_root or default_cache_root()
    key = cache_key(cascade, settings, memo=root / DIGEST_MEMO)
    folder = cache_dir_for(key, root)
    folders = [folder / "base"] + ([folder / "sr"] if settings.with_sr else [])
    batches = [range(first, min(n, first + batch_size)) for first in range(0, n, batch_size)]
    rank, world_size = share
    mine = [b for k, b in enumerate(batches) if k % world_size == rank]
    order = mine + [b for b in batches if b not in mine]
    if not _missing(folders, range(n)):
        return folder, 0
    draw = _ClassImageDrawer(cascade, class_embeds, negative_embeds, settings, key, folders, runners, sr_embeds)
    said = []

    def on_wait() -> None:  # a run's own ranks wait for each other quietly; a lone run says once why it waits
        if world_size == 1 and not said:
            tqdm.write(f"waiting for another process drawing class images into {folder}")
            said.append(True)

    with tqdm(total=n, initial=n - len(_missing(folders, range(n))), unit="img",
              desc=f"class images for {settings.prompt!r}") as bar:
        for wait in (False, True):  # first take every free batch, then wait for those others are drawing
            for batch in order:
                if not _missing(folders, batch):
                    continue
                claim = folder / ".claims" / f"{batch.start:04d}-{batch.stop:04d}"
                with file_lock(claim, wait=wait, on_wait=on_wait) as claimed:
                    if claimed:  # after a wait: nothing is missing, unless the claimant died
                        draw(_missing(folders, batch))
                bar.n = n - len(_missing(folders, range(n)))
                bar.refresh()
    return folder, draw.drawn


def image_generators(seed: int, indices: list[int]) -> list[torch.Generator]:
    """One generator per class image, seeded from the run's seed and the image's index."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + index) for index in indices]


class _ClassImageDrawer:
    """Draws given class images (by index) with the frozen cascade and writes them; counts what it drew."""

    def __init__(self, cascade: Cascade, class_embeds: torch.Tensor, negative_embeds: torch.Tensor,
                 settings: PriorSettings, key: dict, folders: list[Path], runners: dict[str, UnetFn] | None,
                 sr_embeds: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.cascade, self.settings, self.key, self.folders = cascade, settings, key, folders
        unet = cascade.base_unet if cascade.base_unet is not None else cascade.sr_unet
        self.place = {"device": unet.device, "dtype": unet.dtype}
        self.class_embeds, self.negative_embeds = class_embeds.to(**self.place), negative_embeds.to(**self.place)
        self.sr_embeds = tuple(e.to(**self.place) for e in sr_embeds) if sr_embeds is not None else None
        if runners is None:
            base_unet = cascade.base_unet
            if base_unet is None:  # an SR-only run: its class images are still stage I's samples, upscaled
                base_unet = load_unet(cascade.base_dir, str(unet.device), unet.dtype)
            runners = {"base": torch_unet_fn(base_unet)}
            if settings.with_sr:
                runners["sr"] = torch_unet_fn(cascade.sr_unet)
        self.runners = runners
        self.drawn = 0
        self.batch_size: int | None = None  # set lower after an out-of-memory error

    def _sr_embeds(self, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.sr_embeds is None else (self.sr_embeds[0].expand(count, -1, -1), self.sr_embeds[1])

    def __call__(self, indices: list[int]) -> None:
        s = self.settings
        if indices and not (self.folders[0].parent / "key.json").is_file():
            atomic_write_json(self.folders[0].parent / "key.json", self.key)
        while indices:
            count = min(len(indices), self.batch_size or len(indices))
            part = indices[:count]
            try:
                images = sample_cascade(self.cascade, self.runners, self.class_embeds.expand(count, -1, -1),
                                        self.negative_embeds, stages=("base", "sr") if s.with_sr else ("base",),
                                        base_steps=s.base_steps, base_guidance=s.guidance_scale,
                                        sr_steps=s.sr_steps, sr_guidance=s.sr_guidance_scale,
                                        noise_level=s.sr_noise_level, sampler=s.sampler,
                                        generator=image_generators(s.seed, part), progress=False,
                                        sr_embeds=self._sr_embeds(count), sr_input_size=self.cascade.sr_input_size)
            except torch.OutOfMemoryError:
                if count == 1:
                    raise UserError("one class image does not fit in the device's memory: pass --precision bf16, "
                                    "or --prior-mode predictions (no class images)") from None
                self.batch_size = count // 2
                tqdm.write(f"class images: a batch of {count} does not fit in memory; drawing {self.batch_size} "
                           "at a time")
                continue
            # The base image is written last: an image counts as done once every folder has it.
            for stage in ("sr", "base") if s.with_sr else ("base",):
                for index, pil in zip(part, to_pil(images[stage])):
                    save_png(pil, self.folders[0].parent / stage / f"{index:04d}.png")
            indices = indices[count:]
            self.drawn += count
