"""Helpers for tests that run `dbfast` end to end in-process."""

import json
import shutil
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


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def assert_bad_layout_refused(model, breaks, words: list[str], images, tmp_path: Path) -> None:
    """A copy of `model` broken by `breaks(copy)`: training and `dbfast identifier` on it are each refused in one
    line naming `words`, before anything is written."""
    broken = Path(shutil.copytree(model, tmp_path / "model"))
    breaks(broken)
    out = tmp_path / "run"
    assert_refused(train(broken, images, out), *words, out=out)
    assert_refused(dbfast("identifier", "--model", broken), *words)


def interrupted_then_resumed(model, images, tmp_path: Path, monkeypatch, options: list[str], stop_after: int) -> None:
    """Train `options` straight, then again with Ctrl-C after step `stop_after` (refused with one line naming
    --resume) and --resume: the two give the same weights, bit for bit."""
    from dreambooth_fast.train import StageTrainer

    straight, out = tmp_path / "straight", tmp_path / "run"
    assert train(model, images, straight, *options).exit_code == 0
    step = StageTrainer.optimizer_step

    def interrupted(self):
        if self.step == stop_after:
            raise KeyboardInterrupt  # what Ctrl-C raises in the training loop
        return step(self)

    monkeypatch.setattr(StageTrainer, "optimizer_step", interrupted)
    assert_refused(train(model, images, out, *options), f"interrupted at base step {stop_after}", "--resume")
    monkeypatch.setattr(StageTrainer, "optimizer_step", step)
    result = train(model, images, out, *options, "--resume")
    assert result.exit_code == 0, result.output
    tuned, reference = unet_weights(out), unet_weights(straight)
    assert all(torch.equal(v, reference[k]) for k, v in tuned.items())
