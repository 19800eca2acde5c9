"""Subject photos in, training tensors out: validate, EXIF-orient, convert to RGB, centre-crop, resize.

`read_image` and `load_subject_images` are the one reader of photos: training reads the subject and class images
with them and `dbfast eval` the real photos it scores against, so both see the same pixels.

Problems the user can fix raise UserError (one line naming the file and what to do); problems the run can live
with (a skipped bad file, fewer than 3 photos, a photo smaller than the stage resolution) are `warnings.warn`
UserWarnings.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps

from .errors import UserError
from .identifier import PLACEHOLDER

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# Photo formats we do not read: named in a warning so that a folder of iPhone HEICs is not silently ignored.
_OTHER_IMAGE_SUFFIXES = (".heic", ".heif", ".avif", ".gif", ".bmp", ".tif", ".tiff", ".jxl", ".raw", ".dng")
# The subject photos of `dbfast train`: the only directory where --skip-bad-images applies and 3-5 photos are wanted.
SUBJECT_OPTION = "--images"
MIN_SUBJECT_PHOTOS = 3


@dataclass(frozen=True)
class SubjectImage:
    """One photo: where it came from and its pixels (mode RGB, EXIF orientation applied)."""

    path: Path
    image: Image.Image

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def load_subject_images(images_dir: str | Path, *, skip_bad: bool = False, min_size: int | None = None,
                        option: str = SUBJECT_OPTION) -> list[SubjectImage]:
    """Read every .jpg/.jpeg/.png/.webp in `images_dir` (not recursive, dotfiles ignored), sorted by name.

    An entry with an image suffix that cannot be read as an image (see `read_image`: also a broken link, a link
    loop, a directory) raises UserError naming it, or with `skip_bad` is skipped with a warning (UserError still
    if none is left). With `min_size` (the largest resolution the photos will be trained at) the sizes are
    checked as `check_sizes` does. Messages name `option`, the command-line option the directory came from
    (e.g. "--class-images-dir" for prior images); only for SUBJECT_OPTION do they point at --skip-bad-images
    and warn about fewer than 3 photos.
    """
    paths = _image_paths(Path(images_dir), option)
    subject = option == SUBJECT_OPTION
    what_to_do = "fix or remove the file" + (", or pass --skip-bad-images to go on without it" if subject else "")
    images = []
    for path in paths:
        try:
            images.append(SubjectImage(path, read_image(path)))
        except UserError as err:
            if not skip_bad:
                raise UserError(f"{err}; {what_to_do}") from None
            warnings.warn(f"skipping {err}", UserWarning, stacklevel=2)
    if not images:
        raise UserError(f"{option} {images_dir}: none of its {len(paths)} image files could be read; "
                        "add readable jpg/png/webp images")
    if subject and len(images) < MIN_SUBJECT_PHOTOS:
        count = f"{len(images)} photo" + ("s" if len(images) > 1 else "")
        warnings.warn(f"{option} {images_dir}: only {count} of the subject; DreamBooth wants 3-5 (different poses "
                      "and backgrounds); with fewer it tends to copy the photos rather than learn the subject",
                      UserWarning, stacklevel=2)
    if min_size is not None:
        check_sizes(images, min_size)
    return images


CAPTION_SUFFIX = ".txt"


def caption_path(image: SubjectImage) -> Path:
    return image.path.with_suffix(CAPTION_SUFFIX)


def load_captions(images: Sequence[SubjectImage]) -> list[str]:
    """Each photo's caption from NAME.txt beside it (whitespace collapsed), with [V] where the identifier goes.
    Raises UserError naming every photo without one, or any caption without exactly one [V]."""
    missing = [str(caption_path(im)) for im in images if not caption_path(im).is_file()]
    if missing:
        raise UserError(f"--captions: no caption file {', '.join(missing)}; write one per photo, e.g. "
                        f"'a {PLACEHOLDER} dog on a sofa' (or leave out --captions)")
    captions = []
    for im in images:
        text = " ".join(caption_path(im).read_text(encoding="utf-8").split())
        if text.count(PLACEHOLDER) != 1:
            raise UserError(f"{caption_path(im)}: {text!r} must hold {PLACEHOLDER} once, where the identifier "
                            f"goes (e.g. 'a {PLACEHOLDER} dog on a sofa')")
        captions.append(text)
    return captions


def unused_captions(images: Sequence[SubjectImage]) -> list[Path]:
    """Caption files beside the photos (read only with --captions)."""
    return [caption_path(im) for im in images if caption_path(im).is_file()]


def check_sizes(images: Sequence[SubjectImage], resolution: int) -> None:
    """Warn about photos whose short side is below `resolution` (they get upscaled, so softer); raise UserError
    when any is below half of it (upscaled more than 2x the subject's detail is gone)."""
    too_small = [im for im in images if min(im.size) < resolution / 2]
    if too_small:
        names = ", ".join(f"{im.path} ({im.size[0]}x{im.size[1]})" for im in too_small)
        raise UserError(f"{names}: smaller than half the training resolution {resolution}x{resolution}; "
                        f"use photos at least {resolution}px on the short side (and remove these)")
    small = [im for im in images if min(im.size) < resolution]
    if small:
        names = ", ".join(f"{im.path} ({im.size[0]}x{im.size[1]})" for im in small)
        warnings.warn(f"{names}: short side below the training resolution {resolution}px, will be upscaled "
                      "(softer detail); larger photos give a sharper subject", UserWarning, stacklevel=2)


def prepare(images: Sequence[SubjectImage], resolution: int, *, flip: bool = False) -> torch.Tensor:
    """Centre-crop each photo to a square, resize it to `resolution` and return [N, 3, res, res] float32 in
    [-1, 1], in the order given. With `flip`, the horizontally mirrored copies are appended after the
    originals ([2N, ...]; row N + i is row i mirrored), so the result is deterministic."""
    arrays = [np.asarray(_square(im.image, resolution)) for im in images]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if flip:
        batch = torch.cat([batch, batch.flip(-1)])
    return batch.contiguous()


def _square(image: Image.Image, resolution: int) -> Image.Image:
    # Crop first (resize's own box= lets the filter read pixels outside the square), then Lanczos with
    # reducing_gap, so that a large downscale first box-reduces (area averaging: no aliasing) and only the
    # last <= 3x step is Lanczos.
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return square.resize((resolution, resolution), Image.Resampling.LANCZOS, reducing_gap=3.0)


def _image_paths(images_dir: Path, option: str) -> list[Path]:
    if not images_dir.exists():
        raise UserError(f"{option} {images_dir}: no such directory; give the folder holding the images")
    if not images_dir.is_dir():
        raise UserError(f"{option} {images_dir}: is a file, not a directory; give the folder holding the images")
    entries = sorted(p for p in images_dir.iterdir() if not p.name.startswith("."))
    if not entries:
        raise UserError(f"{option} {images_dir}: the directory is empty; put jpg/png/webp images in it "
                        "(for a subject, 3-5 photos)")
    # Anything named like a photo counts, readable or not (a broken link, a directory): read_image names it.
    paths = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
    if not paths:
        found = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:8])
        more = f" and {len(entries) - 8} more" if len(entries) > 8 else ""
        raise UserError(f"{option} {images_dir}: no .jpg/.jpeg/.png/.webp files (found {found}{more}); "
                        "convert the photos to jpg or png")
    others = [p.name for p in entries if p.suffix.lower() in _OTHER_IMAGE_SUFFIXES]
    if others:
        warnings.warn(f"{option} {images_dir}: ignoring {', '.join(others)} (only jpg/png/webp are read; "
                      "convert them to use them)", UserWarning, stacklevel=3)
    return paths


def read_image(path: Path) -> Image.Image:
    """Decode `path` fully (so truncation shows here, not mid-training), orient it and convert it to RGB.
    Raises UserError("<path>: <what is wrong>") for anything that is not a readable image file."""
    try:
        info = path.stat()  # follows links: a link to nowhere and a link loop fail here
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UserError(f"{path}: symbolic link loop") from None
        if err.errno == errno.ENOENT and path.is_symlink():
            raise UserError(f"{path}: broken symbolic link to {os.readlink(path)}, which does not exist") from None
        raise UserError(f"{path}: cannot read it ({err.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"{path}: a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{path}: not a regular file")  # a pipe or device would block or never end
    if info.st_size == 0:
        raise UserError(f"{path}: empty file (0 bytes)")
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except Image.DecompressionBombError as err:
        raise UserError(f"{path}: too many pixels to read safely ({err})") from None
    except PermissionError:
        raise UserError(f"{path}: permission denied") from None
    except Image.UnidentifiedImageError:
        raise UserError(f"{path}: not an image (or not a jpg/png/webp despite its name)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{path}: corrupt or truncated image ({err})") from None
    return _to_rgb(image, path)


def _to_rgb(image: Image.Image, path: Path) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return _gray_to_rgb8(image)
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    if "A" in mode or "a" in mode or "transparency" in image.info:
        # Transparent pixels have arbitrary colour underneath: composite on white, as a viewer shows them.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")  # L, 1, P, YCbCr, ...
    except ValueError:
        raise UserError(f"{path}: unsupported colour mode {mode}; save it as an 8-bit RGB jpg or png") from None


def _gray_to_rgb8(image: Image.Image) -> Image.Image:
    # Among the formats read, "I;16*" and "I" only come from 16-bit grayscale PNGs, so 0..65535 maps to 0..255
    # (PIL's own convert("L") clips at 255 instead, turning most of the image white). "F" is taken as 0..1.
    values = np.asarray(image, dtype=np.float64)
    scale = 1.0 if image.mode == "F" else 65535.0
    gray = np.clip(np.rint(values / scale * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    # With an embedded ICC profile (print files usually have one) convert through it to sRGB; otherwise PIL's
    # formula (R = (255 - C)(255 - K) / 255, ...). PIL already undoes Adobe's inverted CMYK in JPEGs.
    profile = image.info.get("icc_profile")
    if profile:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass  # a broken profile: fall back to the formula below
    return image.convert("RGB")
