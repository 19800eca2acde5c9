"""What a run must never do: destroy an input, share an output with another run, unpickle code, write
non-finite weights, or end in a traceback when the disk, the options or the output path are wrong."""

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.specifiers import SpecifierSet
from runs import assert_refused, train, unet_weights

from dreambooth_fast.fileio import file_lock

ROOT = Path(__file__).resolve().parents[1]


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def own_model(tiny_cascade, tmp_path) -> Path:
    """A copy of the tiny cascade this test may lose."""
    return Path(shutil.copytree(tiny_cascade, tmp_path / "model"))


# -- 1. inputs are never outputs ------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["the model", "inside the model", "around the model"])
def test_an_output_overlapping_the_model_is_refused_and_the_model_kept(own_model, subject_dir, where):
    output = {"the model": own_model, "inside the model": own_model / "run",
              "around the model": own_model.parent}[where]
    before = tree_digest(own_model)
    result = train(own_model, subject_dir, output, "--overwrite", "--stages", "base")
    assert_refused(result, "--output", "overlaps", "--model")
    assert tree_digest(own_model) == before


def test_an_output_holding_the_photos_is_refused_and_the_photos_kept(tiny_cascade, subject_dir):
    before = tree_digest(subject_dir)
    result = train(tiny_cascade, subject_dir, subject_dir.parent, "--overwrite", "--stages", "base")
    assert_refused(result, "overlaps", "--images")
    assert tree_digest(subject_dir) == before


# -- 2. one run per output; class images drawn once -----------------------------------------------------------
def test_a_second_run_into_an_output_in_use_is_refused(tiny_cascade, subject_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with file_lock(out / ".dbfast.lock", wait=False) as held:
        assert held
        result = train(tiny_cascade, subject_dir, out, "--no-prior", "--stages", "base")
    assert_refused(result, "in use by another dbfast run", str(os.getpid()))
    assert [p.name for p in out.iterdir()] == [".dbfast.lock"]


def test_a_run_killed_with_sigkill_leaves_no_stale_lock(tiny_cascade, subject_dir, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from dreambooth_fast.fileio import "
         "file_lock\nwith file_lock(Path(sys.argv[1]), wait=False): print('held', flush=True); time.sleep(60)",
         str(out / ".dbfast.lock")], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    result = train(tiny_cascade, subject_dir, out, "--no-prior", "--stages", "base")
    assert result.exit_code == 0, result.output


def test_two_runs_needing_the_same_class_images_draw_each_image_once(tiny_cascade, tmp_path, monkeypatch):
    from dreambooth_fast import prior
    from dreambooth_fast.models import load_cascade
    from dreambooth_fast.text import encode_negative, encode_prompts

    cascade = load_cascade(tiny_cascade, stages=("base",))
    embeds = encode_prompts(cascade.tokenizer, cascade.text_encoder, ["a dog"])
    negative = encode_negative(cascade.tokenizer, cascade.text_encoder)
    settings = prior.PriorSettings("a dog", "ddpm", 2, 7.0, 2, 4.0, 250, False, 0)
    drawn = []
    sample_cascade = prior.sample_cascade

    def counting(*args, **kwargs):
        images = sample_cascade(*args, **kwargs)
        drawn.append(len(images["base"]))
        return images

    monkeypatch.setattr(prior, "sample_cascade", counting)
    runs = [threading.Thread(target=prior.generate_class_images,
                             args=(cascade, embeds, negative, 6, settings, tmp_path / "cache", 2)) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert sum(drawn) == 6
    folder = next((tmp_path / "cache").iterdir())
    assert sorted(p.name for p in (folder / "base").iterdir()) == [f"{i:04d}.png" for i in range(6)]


# -- 3. pickle weights are data, never code --------------------------------------------------------------------
class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_unet_holding_objects_is_refused_in_one_line(own_model, subject_dir, tmp_path):
    unet = own_model / "unet"
    weights = unet_weights(own_model)
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({**weights, "payload": _RunsCode(marker)}, unet / "diffusion_pytorch_model.bin")
    result = train(own_model, subject_dir, tmp_path / "out", "--no-prior", "--stages", "base")
    assert_refused(result, "diffusion_pytorch_model.bin", "plain tensors", "safetensors", out=tmp_path / "out")
    assert not marker.exists()


# -- 5. the declared Python is one the code runs on ------------------------------------------------------------
def test_the_declared_python_floor_has_the_standard_library_the_package_imports():
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert "import tomllib" in (ROOT / "dreambooth_fast" / "config.py").read_text()
    assert "3.10" not in SpecifierSet(requires) and "3.11" in SpecifierSet(requires)  # tomllib is 3.11+


# -- 7. a full disk ---------------------------------------------------------------------------------------------
def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_last_checkpoint_survives(
    tiny_cascade, subject_dir, tmp_path, monkeypatch
):
    from dreambooth_fast import checkpoint

    save_file, writes = checkpoint.save_file, []

    def fills_the_disk(*args, **kwargs):
        writes.append(1)
        if len(writes) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", fills_the_disk)
    out = tmp_path / "run"
    result = train(tiny_cascade, subject_dir, out, "--no-prior", "--stages", "base", "--steps", "4",
                   "--checkpoint-every", "1")
    assert_refused(result, "writing the base checkpoint at step 2 failed", "disk is full", "base-000001", "--resume")
    assert (out / "checkpoints" / "base-000001" / "weights.safetensors").is_file()
    monkeypatch.setattr(checkpoint, "save_file", save_file)
    result = train(tiny_cascade, subject_dir, out, "--no-prior", "--stages", "base", "--steps", "4",
                   "--checkpoint-every", "1", "--resume")
    assert result.exit_code == 0, result.output


def test_too_little_free_space_is_said_before_the_run(tiny_cascade, subject_dir, tmp_path, monkeypatch):
    from dreambooth_fast import rundir

    monkeypatch.setattr(rundir, "free_bytes", lambda path: 1000)
    result = train(tiny_cascade, subject_dir, tmp_path / "run", "--stages", "base")
    assert result.exit_code == 0, result.output
    assert "warning: the run's output needs about" in result.output and "1000 B free" in result.output
    assert "warning: 2 class images needs about" in result.output


# -- 9. option values and paths ---------------------------------------------------------------------------------
@pytest.mark.parametrize("option,value", [("--learning-rate", "nan"), ("--learning-rate", "inf"),
                                          ("--learning-rate", "-0.5"),
                                          ("--max-grad-norm", "nan"), ("--max-grad-norm", "0"),
                                          ("--prior-weight", "-1"), ("--prior-weight", "inf"),
                                          ("--min-snr-gamma", "nan"), ("--class-guidance-scale", "-2"),
                                          ("--class-sample-steps", "0"), ("--lr-warmup-steps", "-1")])
def test_a_number_out_of_range_is_refused_before_anything_is_written(tiny_cascade, subject_dir, tmp_path, option,
                                                                    value):
    out = tmp_path / "run"
    assert_refused(train(tiny_cascade, subject_dir, out, option, value), option, value, out=out)


def test_an_option_of_the_wrong_type_in_a_config_file_is_refused(tiny_cascade, subject_dir, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('learning-rate = "fast"\n')
    out = tmp_path / "run"
    assert_refused(train(tiny_cascade, subject_dir, out, "--config", config), "--learning-rate", "float", out=out)


def test_weights_that_went_non_finite_are_never_written(tiny_cascade, subject_dir, tmp_path, monkeypatch):
    from dreambooth_fast import train as training

    make_optimizer = training._optimizer

    def poisons_step_2(params, cfg, lr):
        optimizer = make_optimizer(params, cfg, lr)

        def poison(optimizer, args, kwargs):
            if optimizer.state[params[0]]["step"] == 2:
                params[0].data.fill_(float("nan"))

        optimizer.register_step_post_hook(poison)
        return optimizer

    monkeypatch.setattr(training, "_optimizer", poisons_step_2)
    out = tmp_path / "run"
    result = train(tiny_cascade, subject_dir, out, "--no-prior", "--stages", "base")
    assert_refused(result, "not finite after step 2", "nothing was written")
    assert all(torch.equal(v, unet_weights(tiny_cascade)[k]) for k, v in unet_weights(out).items())


@pytest.mark.parametrize("where", ["/proc/dbfast/run", "a-file/run"])
def test_an_output_that_cannot_be_created_is_one_line(tiny_cascade, subject_dir, tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    Path("a-file").write_text("not a directory")
    assert_refused(train(tiny_cascade, subject_dir, where, "--no-prior"), "--output", where)
