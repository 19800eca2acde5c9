from pathlib import Path

import pytest

from dreambooth_fast.tiny_cascade import build_tiny_cascade

SHARED_PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dreambooth-dog"


@pytest.fixture(scope="session")
def tiny_cascade(tmp_path_factory) -> Path:
    """A tiny random IF cascade (stage I at the path, stage II in stage_2/), built once per test session."""
    return build_tiny_cascade(tmp_path_factory.mktemp("tiny") / "cascade")


@pytest.fixture
def dog_photos() -> Path:
    """The five real photos of the DreamBooth dog, from ../shared beside the checkout."""
    if not SHARED_PHOTOS.is_dir():
        pytest.skip("../shared/data/dreambooth-dog is not beside this checkout")
    return SHARED_PHOTOS
