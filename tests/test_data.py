"""Subject photos: every accepted input becomes an upright RGB image; every bad one is a one-line UserError
naming the file (or a warning where the run can go on)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from runs import assert_refused, train

from dreambooth_fast.data import check_sizes, load_subject_images, prepare
from dreambooth_fast.errors import UserError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def corner_image(width=60, height=40) -> Image.Image:
    """Blue with a red block in the top-left corner: any rotation or mirroring moves the block."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, width // 3, height // 3))
    return image


def close(pixel, colour, tol=40) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, colour))


def load_one(path, **kwargs) -> Image.Image:
    [loaded] = load_subject_images(path.parent, **kwargs)
    assert loaded.path == path
    assert loaded.image.mode == "RGB"
    return loaded.image


# --- real photos ---------------------------------------------------------------------------------------------

def test_real_photos_load_sorted_and_prepare(dog_photos):
    images = load_subject_images(dog_photos, min_size=64)  # SOURCE.txt beside them is ignored
    assert [im.path.name for im in images] == ["00.jpg", "01.jpg", "02.jpg", "03.jpg", "04.jpg"]
    for resolution in (32, 64):
        batch = prepare(images, resolution)
        assert batch.shape == (5, 3, resolution, resolution) and batch.dtype == torch.float32
        assert batch.min() >= -1 and batch.max() <= 1
        assert batch.std() > 0.1  # real content, not a constant
    flipped = prepare(images, 32, flip=True)
    assert flipped.shape == (10, 3, 32, 32)
    assert torch.equal(flipped[5:], flipped[:5].flip(-1))


# --- odd but valid inputs: handled, not rejected -------------------------------------------------------------

def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; show the pixels rotated 90 degrees clockwise
    corner_image(60, 40).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    image = load_one(tmp_path / "rotated.jpg")
    assert image.size == (40, 60)
    assert close(image.getpixel((35, 5)), RED)  # the top-left block is now top-right
    assert close(image.getpixel((5, 5)), BLUE)
    assert close(image.getpixel((35, 55)), BLUE)


def test_grayscale_becomes_rgb(tmp_path):
    Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1)), mode="L").save(tmp_path / "g.png")
    pixels = np.asarray(load_one(tmp_path / "g.png"))
    assert pixels.shape == (16, 64, 3)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert pixels[0, 10, 0] == 40


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # really 16-bit on disk
    pixels = np.asarray(load_one(tmp_path / "deep.png"))[0, :, 0].astype(int)
    expected = np.rint(ramp[0] / 257).astype(int)
    assert np.abs(pixels - expected).max() <= 1
    assert pixels[0] == 0 and pixels[-1] == 255 and 120 <= pixels[32] <= 135  # mid-grey stays mid-grey


@pytest.mark.parametrize("mode, opaque", [("RGBA", BLUE), ("LA", (29, 29, 29))])  # blue's luma is 29
def test_transparency_is_composited_on_white(tmp_path, mode, opaque):
    image = Image.new("RGBA", (20, 10), (255, 0, 0, 0))  # left: fully transparent red
    image.paste((0, 0, 255, 255), (10, 0, 20, 10))  # right: opaque blue
    image.convert(mode).save(tmp_path / "alpha.png")
    loaded = load_one(tmp_path / "alpha.png")
    assert loaded.getpixel((2, 5)) == WHITE
    assert loaded.getpixel((15, 5)) == opaque


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (20, 10), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.paste(1, (10, 0, 20, 10))
    image.save(tmp_path / "pal.png", transparency=0)
    loaded = load_one(tmp_path / "pal.png")
    assert loaded.getpixel((2, 5)) == WHITE
    assert loaded.getpixel((15, 5)) == GREEN


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    image = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan ink
    image.paste((0, 0, 0, 255), (0, 0, 8, 16))  # left half: pure black ink
    image.save(tmp_path / "print.jpg", quality=95)
    loaded = load_one(tmp_path / "print.jpg")
    assert close(loaded.getpixel((12, 8)), (0, 255, 255))
    assert close(loaded.getpixel((3, 8)), (0, 0, 0))


def test_upper_case_suffixes_and_webp_are_read_dotfiles_ignored(tmp_path):
    corner_image().save(tmp_path / "b.JPG")
    corner_image().save(tmp_path / "a.webp")
    corner_image().save(tmp_path / "c.Png")
    (tmp_path / "._b.JPG").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (tmp_path / "notes.txt").write_text("not a photo")
    assert [im.path.name for im in load_subject_images(tmp_path)] == ["a.webp", "b.JPG", "c.Png"]


def test_other_photo_formats_are_named_in_a_warning(tmp_path):
    corner_image().save(tmp_path / "a.jpg")
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"....ftypheic")
    with pytest.warns(UserWarning, match="IMG_0001.HEIC"):
        assert len(load_subject_images(tmp_path)) == 1


# --- bad inputs: a clear error naming the file, or a warning and skip -----------------------------------------

def test_missing_dir(tmp_path):
    with pytest.raises(UserError, match="^--images .*nope: no such directory"):
        load_subject_images(tmp_path / "nope")
    with pytest.raises(UserError, match="^--class-images-dir .*nope: no such directory"):
        load_subject_images(tmp_path / "nope", option="--class-images-dir")


def test_file_instead_of_dir(tmp_path):
    corner_image().save(tmp_path / "a.jpg")
    with pytest.raises(UserError, match="not a directory"):
        load_subject_images(tmp_path / "a.jpg")


def test_empty_dir(tmp_path):
    with pytest.raises(UserError, match="empty"):
        load_subject_images(tmp_path)


def test_dir_without_images_lists_what_it_found(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    (tmp_path / "photo.gif").write_bytes(b"GIF89a")
    (tmp_path / "sub").mkdir()
    with pytest.raises(UserError, match=r"no \.jpg.*found photo\.gif, readme\.txt, sub/"):
        load_subject_images(tmp_path)


def write_good_and(tmp_path, name, data: bytes):
    corner_image().save(tmp_path / "good.jpg")
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


def truncated_jpeg() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


@pytest.mark.parametrize("name, data, reason", [
    ("zero.jpg", b"", "empty file"),
    ("notes.jpg", b"these are my notes, saved with the wrong name\n", "not an image"),
    ("noise.png", bytes(range(256)) * 4, "not an image"),
    ("cut.jpg", truncated_jpeg(), "truncated"),
])
def test_bad_file_is_named_with_the_skip_option(tmp_path, name, data, reason):
    bad = write_good_and(tmp_path, name, data)
    with pytest.raises(UserError, match=reason) as err:
        load_subject_images(tmp_path)
    message = str(err.value)
    assert str(bad) in message and "--skip-bad-images" in message and "\n" not in message


def test_skip_bad_warns_and_goes_on(tmp_path):
    write_good_and(tmp_path, "cut.jpg", truncated_jpeg())
    with pytest.warns(UserWarning, match="cut.jpg"):
        images = load_subject_images(tmp_path, skip_bad=True)
    assert [im.path.name for im in images] == ["good.jpg"]


def _broken_link(path):
    path.symlink_to(path.parent / "deleted.jpg")


def _link_loop(path):
    path.symlink_to(path)


def _directory(path):
    path.mkdir()


def _pipe(path):
    os.mkfifo(path)  # opening it to read would wait forever for a writer


def _no_read_permission(path):
    corner_image().save(path)
    path.chmod(0)


@pytest.mark.parametrize("make, reason", [
    (_broken_link, "broken symbolic link"),
    (_link_loop, "symbolic link loop"),
    (_directory, "a directory"),
    (_pipe, "not a regular file"),
    pytest.param(_no_read_permission, "permission denied", marks=pytest.mark.skipif(
        os.geteuid() == 0, reason="root reads a file without read permission")),
])
def test_unreadable_entry_named_like_a_photo_is_named_not_ignored(tmp_path, make, reason):
    corner_image().save(tmp_path / "good.jpg")
    make(tmp_path / "bad.jpg")
    with pytest.raises(UserError, match=reason) as err:
        load_subject_images(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "bad.jpg") in message and "--skip-bad-images" in message and "\n" not in message
    with pytest.warns(UserWarning, match="bad.jpg"):
        images = load_subject_images(tmp_path, skip_bad=True)
    assert [im.path.name for im in images] == ["good.jpg"]


def test_skip_bad_with_nothing_left_is_an_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.png").write_text("nope")
    with pytest.warns(UserWarning), pytest.raises(UserError, match="none of its 2 image files"):
        load_subject_images(tmp_path, skip_bad=True)


def test_small_image_warns_and_too_small_refuses(tmp_path):
    corner_image(100, 48).save(tmp_path / "small.png")  # short side 48: below 64, above half of it
    images = load_subject_images(tmp_path)
    with pytest.warns(UserWarning, match=r"small\.png \(100x48\).*64"):
        check_sizes(images, 64)
    with pytest.raises(UserError, match=r"small\.png \(100x48\).*half"):
        check_sizes(images, 128)
    check_sizes(images, 48)  # big enough: silent
    with pytest.raises(UserError, match="half"):
        load_subject_images(tmp_path, min_size=128)


def test_fewer_than_three_photos_warn_and_load(tmp_path):
    corner_image().save(tmp_path / "a.jpg")
    corner_image().save(tmp_path / "b.jpg")
    with pytest.warns(UserWarning, match=r"only 2 photos.*3-5"):
        assert len(load_subject_images(tmp_path)) == 2


def test_three_photos_load_without_a_warning(tmp_path, recwarn):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        corner_image().save(tmp_path / name)
    assert len(load_subject_images(tmp_path)) == 3
    assert not recwarn.list


def test_few_class_images_do_not_warn(tmp_path, recwarn):
    corner_image().save(tmp_path / "a.jpg")
    assert len(load_subject_images(tmp_path, option="--class-images-dir")) == 1
    assert not recwarn.list


# --- prepare --------------------------------------------------------------------------------------------------

def test_prepare_centre_crops_and_scales_to_minus_one_one(tmp_path):
    image = Image.new("RGB", (96, 32), RED)  # red | green | blue thirds: the centre square is green
    image.paste(GREEN, (32, 0, 64, 32))
    image.paste(BLUE, (64, 0, 96, 32))
    image.save(tmp_path / "wide.png")
    batch = prepare(load_subject_images(tmp_path), 16)
    assert batch.shape == (1, 3, 16, 16)
    assert torch.equal(batch[0, 1], torch.ones(16, 16))  # nothing of the red and blue thirds leaks in
    assert torch.equal(batch[0, [0, 2]], -torch.ones(2, 16, 16))
    assert batch.min() >= -1 and batch.max() <= 1


def test_prepare_flip_appends_mirrored_copies(tmp_path):
    corner_image(40, 40).save(tmp_path / "a.png")
    corner_image(50, 50).save(tmp_path / "b.png")
    images = load_subject_images(tmp_path)
    plain, flipped = prepare(images, 24), prepare(images, 24, flip=True)
    assert flipped.shape == (4, 3, 24, 24)
    assert torch.equal(flipped[:2], plain) and torch.equal(flipped[2:], plain.flip(-1))
    assert flipped[2, 0, 1, -2] > 0.9 and flipped[2, 0, 1, 1] < -0.9  # red block now top-right


# --- through `dbfast train` -----------------------------------------------------------------------------------

def test_train_with_two_photos_prints_a_warning_and_trains(tiny_cascade, subject_dir, tmp_path):
    for extra in sorted(subject_dir.iterdir())[2:]:
        extra.unlink()
    result = train(tiny_cascade, subject_dir, tmp_path / "out", "--no-prior", "--stages", "base")
    assert result.exit_code == 0, result.output
    assert f"warning: --images {subject_dir}: only 2 photos of the subject; DreamBooth wants 3-5" in result.output
    assert (tmp_path / "out" / "dreambooth.json").is_file()


def test_train_names_a_broken_link_among_the_photos(tiny_cascade, subject_dir, tmp_path):
    (subject_dir / "moved.jpg").symlink_to(tmp_path / "elsewhere.jpg")
    result = train(tiny_cascade, subject_dir, tmp_path / "out")
    assert_refused(result, "moved.jpg: broken symbolic link", "--skip-bad-images", out=tmp_path / "out")
