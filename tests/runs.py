"""Helpers for tests that run `dbfast` end to end in-process."""

from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dreambooth_fast.cli import main

# Few steps and few class images: the tests check the pipeline, not the pictures.
FAST = [
    "--steps",
    "2",
    "--num-class-images",
    "2",
    "--class-sample-steps",
    "2",
    "--sr-sample-steps",
    "2",
    "--device",
    "cpu",
]


def dbfast(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def train(model, images, output, *extra):
    return dbfast("train", "--model", model, "--images", images, "--class", "dog", "--output", output, *FAST, *extra)


def unet_weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(stage_dir / "unet" / "diffusion_pytorch_model.safetensors")


def assert_refused(result, *words: str, out: Path | None = None) -> None:
    """A user mistake: exit code 2, one `error:` line naming `words`, no traceback, `out` not created."""
    assert result.exit_code == 2, result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("error: ") and "Traceback" not in result.output
    for word in words:
        assert word in message, message
    if out is not None:
        assert not out.exists()
