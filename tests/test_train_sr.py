"""The super-resolution stage is fine-tuned the paper's way: on (real low-res subject, high-res subject) pairs,
the low-res input noise-augmented at a low level that is also the UNet's class label."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from runs import assert_refused, train, unet_weights

from dreambooth_fast import data
from dreambooth_fast.models import load_cascade
from dreambooth_fast.train import StageTrainer, stage_data


def test_sr_step_conditions_on_the_real_low_res_image_not_the_noisy_target(
    tiny_cascade, subject_dir, tmp_path, monkeypatch
):
    """diffusers' IF stage II script feeds the noisy target twice (their issue 3658); we feed the subject photo
    at the base resolution, upsampled back, with augmentation noise at --sr-noise-level only."""
    seen = []
    loss = StageTrainer.loss

    def recording_loss(self):
        forward = self.unet.forward

        def spy(sample, timestep, *args, class_labels=None, **kwargs):
            seen.append((sample.detach().clone(), class_labels.clone()))
            return forward(sample, timestep, *args, class_labels=class_labels, **kwargs)

        self.unet.forward = spy
        try:
            return loss(self)
        finally:
            del self.unet.forward

    monkeypatch.setattr(StageTrainer, "loss", recording_loss)
    out = tmp_path / "run"
    result = train(tiny_cascade, subject_dir, out, "--stages", "sr", "--no-prior", "--steps", "1", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    sample, class_labels = seen[0]
    assert sample.shape[1] == 6 and torch.equal(class_labels, torch.zeros(4, dtype=torch.long))
    images = data.load_subject_images(subject_dir)
    low_res = F.interpolate(data.prepare(images, 32), (64, 64), mode="bilinear", align_corners=True)
    conditioning = sample[:, 3:]
    # Each row's conditioning is one subject photo's upscaled low-res image plus noise of std ~0.0064 (level 0).
    distances = torch.cdist(conditioning.flatten(1), low_res.flatten(1)) / conditioning[0].numel() ** 0.5
    assert distances.min(dim=1).values.max() < 0.01
    assert (conditioning - sample[:, :3]).abs().mean() > 0.1  # not the noisy target again


def test_sr_only_training_on_a_tuned_base_keeps_the_base_and_its_identifier(tiny_cascade, subject_dir, tmp_path):
    base_run, sr_run = tmp_path / "base", tmp_path / "sr"
    assert train(tiny_cascade, subject_dir, base_run, "--stages", "base", "--no-prior").exit_code == 0
    result = train(base_run, subject_dir, sr_run, "--stages", "sr", "--no-prior")
    assert result.exit_code == 0, result.output
    first, second = (json.loads((p / "dreambooth.json").read_text()) for p in (base_run, sr_run))
    assert second["identifier"] == first["identifier"] and second["stages"] == ["sr"]
    assert all(torch.equal(v, unet_weights(base_run)[k]) for k, v in unet_weights(sr_run).items())
    tuned_sr, original_sr = unet_weights(sr_run / "stage_2"), unet_weights(tiny_cascade / "stage_2")
    assert any(not torch.equal(v, original_sr[k]) for k, v in tuned_sr.items())
    assert not (sr_run / "checkpoints" / "base-000002").exists() and not (sr_run / "validation").exists()


def test_sr_stage_alone_on_a_model_without_stage_2_is_refused(tiny_cascade, subject_dir, tmp_path):
    base_only = tmp_path / "base-only"
    shutil.copytree(tiny_cascade, base_only, ignore=shutil.ignore_patterns("stage_2"))
    assert_refused(
        train(base_only, subject_dir, tmp_path / "out", "--stages", "sr"), "--sr-model", out=tmp_path / "out"
    )


def test_sr_prior_pairs_are_frozen_sr_upscalings_of_the_class_images(tiny_cascade, subject_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # an empty cache: an SR-only run draws them itself
    out = tmp_path / "run"
    result = train(
        tiny_cascade, subject_dir, out, "--stages", "sr", "--validation-prompt", "a [V] dog", "--validation-every", "2"
    )
    assert result.exit_code == 0, result.output
    run = json.loads((out / "dreambooth.json").read_text())
    assert Image.open(f"{run['class_images']}/base/0000.png").size == (32, 32)
    assert Image.open(f"{run['class_images']}/sr/0000.png").size == (64, 64)
    rows = stage_data(
        "sr",
        load_cascade(tiny_cascade, with_text_encoder=False),
        data.load_subject_images(subject_dir),
        Path(run["class_images"]),
        flip=False,
        user_class_images=False,
    )
    assert rows.prior.shape == (2, 3, 64, 64) and rows.prior_cond.shape == (2, 3, 64, 64)
    assert Image.open(out / "validation" / "sr-step-000002.png").size == (512, 256)  # 128 x 64 enlarged 4x


@pytest.mark.slow
def test_sr_stage_resumes_bit_for_bit_after_ctrl_c(tiny_cascade, subject_dir, tmp_path, monkeypatch):
    common = ["--steps", "4", "--no-prior", "--checkpoint-every", "100"]
    straight = tmp_path / "straight"
    assert train(tiny_cascade, subject_dir, straight, *common).exit_code == 0
    step = StageTrainer.optimizer_step

    def interrupted_in_sr(self):
        if self.stage == "sr" and self.step == 2:
            raise KeyboardInterrupt
        return step(self)

    out = tmp_path / "run"
    monkeypatch.setattr(StageTrainer, "optimizer_step", interrupted_in_sr)
    assert_refused(train(tiny_cascade, subject_dir, out, *common), "interrupted at sr step 2")
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["completed_stages"] == ["base"]
    monkeypatch.setattr(StageTrainer, "optimizer_step", step)
    assert train(tiny_cascade, subject_dir, out, *common, "--resume").exit_code == 0
    for stage in (out, out / "stage_2"):
        reference = unet_weights(straight / stage.relative_to(out))
        assert all(torch.equal(v, reference[k]) for k, v in unet_weights(stage).items())


def test_bf16_training_runs_on_the_cpu(tiny_cascade, subject_dir, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_cascade, subject_dir, out, "--precision", "bf16", "--no-prior", "--stages", "base")
    assert result.exit_code == 0, result.output
    tuned, original = unet_weights(out), unet_weights(tiny_cascade)
    assert all(v.dtype == torch.float32 for v in tuned.values())  # master weights stay fp32
    assert any(not torch.equal(v, original[k]) for k, v in tuned.items())
