"""How the prior is made: the class-image samplers (ddpm, DPM-Solver++, IF's timestep presets) and their place in
the class-image cache key, the batch size, the backend that draws them, and the image-free prior
(--prior-mode predictions)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from runs import assert_refused, dbfast, interrupted_then_resumed, train

from dreambooth_fast import prior
from dreambooth_fast.errors import UserError
from dreambooth_fast.models import load_cascade
from dreambooth_fast.sample import sample_cascade, torch_unet_fn
from dreambooth_fast.samplers import SAMPLERS, sampler_schedule
from dreambooth_fast.text import encode_negative, encode_prompts


@pytest.fixture(scope="module")
def base_pipe(tiny_cascade):
    from diffusers import IFPipeline

    return IFPipeline.from_pretrained(tiny_cascade, safety_checker=None, watermarker=None, feature_extractor=None)


@pytest.fixture(scope="module")
def cascade(tiny_cascade):
    return load_cascade(tiny_cascade, stages=("base", "sr"))


@pytest.fixture(scope="module")
def embeds(cascade):
    return (encode_prompts(cascade.tokenizer, cascade.text_encoder, ["a dog", "a dog"]),
            encode_negative(cascade.tokenizer, cascade.text_encoder))


def _ours(cascade, embeds, sampler, steps=4, stages=("base",), seeds=(1, 2), **kwargs):
    cond, uncond = embeds
    runners = {"base": torch_unet_fn(cascade.base_unet), "sr": torch_unet_fn(cascade.sr_unet)}
    return sample_cascade(cascade, runners, cond[: len(seeds)], uncond, stages=stages, base_steps=steps,
                          sr_steps=steps, base_guidance=5.0, sampler=sampler,
                          generator=[torch.Generator().manual_seed(s) for s in seeds], progress=False, **kwargs)


def test_an_if_preset_samples_what_ifpipeline_samples_with_those_timesteps(base_pipe, cascade, embeds):
    from diffusers.pipelines.deepfloyd_if.timesteps import smart27_timesteps

    cond, uncond = embeds
    theirs = base_pipe(prompt_embeds=cond, negative_prompt_embeds=uncond.expand(2, -1, -1), timesteps=smart27_timesteps,
                       guidance_scale=5.0, generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                       output_type="pt").images
    torch.testing.assert_close(_ours(cascade, embeds, "smart27")["base"], theirs, rtol=1e-5, atol=1e-5)


def test_dpm_solver_samples_what_ifpipeline_samples_with_that_scheduler(base_pipe, cascade, embeds):
    from diffusers import DPMSolverMultistepScheduler

    cond, uncond = embeds
    original = base_pipe.scheduler
    base_pipe.scheduler = DPMSolverMultistepScheduler.from_config(original.config, algorithm_type="dpmsolver++",
                                                                  timestep_spacing="linspace")
    try:
        theirs = base_pipe(prompt_embeds=cond, negative_prompt_embeds=uncond.expand(2, -1, -1), num_inference_steps=5,
                           guidance_scale=5.0, generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                           output_type="pt").images
    finally:
        base_pipe.scheduler = original
    torch.testing.assert_close(_ours(cascade, embeds, "dpm++", steps=5)["base"], theirs, rtol=1e-5, atol=1e-5)


def test_dpm_solver_keeps_the_models_noise_schedule_and_thresholding(cascade):
    scheduler, timesteps = sampler_schedule(cascade.base_scheduler, "dpm++")
    assert timesteps is None and type(scheduler).__name__ == "DPMSolverMultistepScheduler"
    for key in ("beta_schedule", "prediction_type", "thresholding", "sample_max_value", "variance_type"):
        assert scheduler.config[key] == cascade.base_scheduler.config[key]
    assert scheduler.config.algorithm_type == "dpmsolver++"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_both_stages(cascade, embeds, sampler):
    images = _ours(cascade, embeds, sampler, steps=3, stages=("base", "sr"), seeds=(0,))
    assert images["base"].shape[0] == images["sr"].shape[0] == 1
    assert torch.isfinite(images["sr"]).all()


def test_an_if_preset_on_a_scheduler_of_other_length_is_a_user_error(cascade):
    from diffusers import DDPMScheduler

    short = DDPMScheduler.from_config(cascade.base_scheduler.config, num_train_timesteps=500)
    with pytest.raises(UserError, match="1000-step"):
        sampler_schedule(short, "fast27")
    with pytest.raises(UserError, match="choose one of"):
        sampler_schedule(short, "euler")


# -- the class-image cache --------------------------------------------------------------------------------------
def _settings(sampler="ddpm", steps=2):
    return prior.PriorSettings("a dog", sampler, steps, 7.0, 2, 4.0, 250, False, 0)


def test_the_sampler_is_part_of_the_class_image_cache_key(cascade, embeds, tmp_path):
    cond, uncond = embeds
    folders = {s: prior.generate_class_images(cascade, cond[:1], uncond, 2, _settings(s), tmp_path)[0] for s in
               ("ddpm", "dpm++")}
    assert folders["ddpm"] != folders["dpm++"]
    for sampler, folder in folders.items():
        assert json.loads((folder / "key.json").read_text())["sampler"] == sampler
        assert len(list((folder / "base").glob("*.png"))) == 2


def test_the_weights_digests_are_remembered_without_changing_the_cache_key(cascade, embeds, tmp_path):
    cond, uncond = embeds
    folder, _ = prior.generate_class_images(cascade, cond[:1], uncond, 1, _settings(), tmp_path)
    memo = tmp_path / prior.DIGEST_MEMO
    assert memo.is_file()  # the next run reads the digests from it instead of re-reading the weights
    assert folder == prior.cache_dir_for(prior.cache_key(cascade, _settings()), tmp_path)  # the key without it
    assert prior.cache_key(cascade, _settings(), memo) == prior.cache_key(cascade, _settings())


def test_class_images_do_not_depend_on_the_batch_size(cascade, embeds, tmp_path):
    cond, uncond = embeds
    one, _ = prior.generate_class_images(cascade, cond[:1], uncond, 3, _settings(), tmp_path / "a", batch_size=1)
    three, _ = prior.generate_class_images(cascade, cond[:1], uncond, 3, _settings(), tmp_path / "b", batch_size=3)
    assert one.name == three.name  # the same cache key
    for i in range(3):
        a, b = (np.asarray(Image.open(f / "base" / f"{i:04d}.png"), dtype=int) for f in (one, three))
        assert np.abs(a - b).max() <= 1  # a batched matmul may round differently; never a different image


def test_train_records_the_class_sampler_and_refuses_an_unknown_one(tiny_cascade, subject_dir, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_cascade, subject_dir, out, "--stages", "base", "--class-sampler", "dpm++")
    assert result.exit_code == 0, result.output
    run = json.loads((out / "dreambooth.json").read_text())
    assert run["config"]["class_sampler"] == "dpm++"
    assert json.loads((Path(run["class_images"]) / "key.json").read_text())["sampler"] == "dpm++"
    refused = train(tiny_cascade, subject_dir, tmp_path / "other", "--class-sampler", "euler")
    assert refused.exit_code == 2 and "--class-sampler" in refused.output
    assert not (tmp_path / "other").exists()


def test_class_images_can_be_drawn_by_the_onnx_export_of_the_input_model(tiny_cascade, subject_dir, tmp_path,
                                                                          monkeypatch):
    export = tmp_path / "export"
    assert dbfast("export", "--model", tiny_cascade, "--onnx", "--out", export).exit_code == 0
    images = {}
    for backend in ("torch", "onnx"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / f"cache-{backend}"))  # each draws its own
        out = tmp_path / backend
        result = train(tiny_cascade, subject_dir, out, "--class-backend", backend, "--class-export-dir", export)
        assert result.exit_code == 0, result.output
        folder = Path(json.loads((out / "dreambooth.json").read_text())["class_images"])
        images[backend] = [np.asarray(Image.open(p), dtype=int) for p in sorted(folder.glob("*/*.png"))]
    assert len(images["onnx"]) == len(images["torch"]) == 4  # 2 class images, base and sr
    for a, b in zip(images["onnx"], images["torch"]):
        assert np.abs(a - b).mean() < 1.0  # the same images, up to the export's rounding


def test_class_images_on_a_backend_without_an_export_are_refused_before_anything_is_written(
    tiny_cascade, subject_dir, tmp_path
):
    out = tmp_path / "run"
    result = train(tiny_cascade, subject_dir, out, "--class-backend", "onnx", "--class-export-dir", tmp_path / "none")
    assert_refused(result, "dbfast export", out=out)


# -- --prior-mode predictions -----------------------------------------------------------------------------------
def _metrics(out: Path) -> list[dict]:
    with open(out / "logs" / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("options", [[], ["--lora-rank", "4"]], ids=["full", "lora"])
def test_prior_predictions_draw_no_class_images_and_start_at_zero_prior_loss(
    tiny_cascade, subject_dir, tmp_path, options
):
    """The prior target is the frozen model's own prediction on the same noisy input: before the first update
    the trained UNet is the frozen one, so the first step's prior loss is zero; later ones are not."""
    out = tmp_path / "run"
    result = train(tiny_cascade, subject_dir, out, "--stages", "base,sr", "--prior-mode", "predictions",
                   "--steps", "3", "--lr", "1e-3", *options)
    assert result.exit_code == 0, result.output
    run = json.loads((out / "dreambooth.json").read_text())
    assert run["class_images"] is None and run["config"]["prior_mode"] == "predictions"
    rows = _metrics(out)
    for stage in ("base", "sr"):
        losses = [float(r["prior_loss"]) for r in rows if r["stage"] == stage]
        assert losses[0] < 1e-10 < max(losses[1:]), (stage, losses)


def test_prior_predictions_resume_bit_exactly(tiny_cascade, subject_dir, tmp_path, monkeypatch):
    """The frozen model is the loaded model, not the checkpoint's weights: a resumed run trains as if unbroken."""
    options = ["--stages", "base", "--prior-mode", "predictions", "--steps", "4", "--checkpoint-every", "100",
               "--lr", "1e-3"]
    interrupted_then_resumed(tiny_cascade, subject_dir, tmp_path, monkeypatch, options, stop_after=2)


@pytest.mark.parametrize("options, words", [
    (["--no-prior"], ["--prior-mode predictions", "--no-prior"]),
    (["--class-images-dir", "somewhere"], ["--class-images-dir"]),
    (["--prior-mode", "nothing"], ["--prior-mode"]),
])
def test_prior_predictions_with_a_contradicting_option_is_refused(tiny_cascade, subject_dir, tmp_path, options,
                                                                   words):
    out = tmp_path / "run"
    result = train(tiny_cascade, subject_dir, out, "--prior-mode", "predictions", *options)
    assert result.exit_code == 2, result.output
    assert all(w in result.output for w in words) and "Traceback" not in result.output
    assert not out.exists()
