from pathlib import Path

import pytest
from PIL import Image

from dreambooth_fast.toy.tiny_cascade import build_tiny_cascade
from dreambooth_fast.toy.tiny_sd import build_tiny_sd

SHARED_PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dreambooth-dog"


@pytest.fixture(scope="session")
def tiny_cascade(tmp_path_factory) -> Path:
    """A tiny random IF cascade (stage I at the path, stage II in stage_2/), built once per test session."""
    return build_tiny_cascade(tmp_path_factory.mktemp("tiny") / "cascade")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion 1.x-style model: PNDM, epsilon prediction, 32 px images, 8 px latents."""
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "sd15")


@pytest.fixture
def dog_photos() -> Path:
    """The five real photos of the DreamBooth dog, from ../shared beside the checkout."""
    if not SHARED_PHOTOS.is_dir():
        pytest.skip("../shared/data/dreambooth-dog is not beside this checkout")
    return SHARED_PHOTOS


@pytest.fixture(autouse=True)
def class_image_cache(tmp_path_factory, monkeypatch):
    """Class images are cached per user: keep the tests' cache out of the user's home."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


@pytest.fixture
def subject_dir(tmp_path) -> Path:
    """Four small synthetic subject photos (a red square on different backgrounds)."""
    folder = tmp_path / "subject"
    folder.mkdir()
    for i, background in enumerate(["white", "blue", "green", "gray"]):
        image = Image.new("RGB", (80, 80), background)
        image.paste((220, 20, 20), (20 + 4 * i, 20, 60 + 4 * i, 60))
        image.save(folder / f"{i}.png")
    return folder
