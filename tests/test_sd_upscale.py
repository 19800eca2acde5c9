"""Stable Diffusion's SR stage (issue 19, item 5): the x4 upscaler (StableDiffusionUpscalePipeline) on a tiny random one
built here (toy/tiny_sd.py: 16 px in, 64 px out), checked and loaded, sampled as the pipeline samples, fine-tuned like
IF's stage II on (low-res subject, high-res subject) pairs in its VAE's latents, with and without prior, LoRA, resume,
the output's stage_2/ loaded by diffusers, generation base -> x4, the explicit --stages rule, and ONNX export."""

import importlib.util
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from runs import assert_refused, dbfast, edit_json, train, unet_weights

from dreambooth_fast import data
from dreambooth_fast.lora import LORA_WEIGHTS
from dreambooth_fast.models import check_stage_dir, load_cascade, load_unet
from dreambooth_fast.sd_upscale import NO_TENSORRT
from dreambooth_fast.toy.tiny_sd import build_tiny_upscaler
from dreambooth_fast.train import StageTrainer


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    return build_tiny_upscaler(tmp_path_factory.mktemp("upscaler") / "x4")


def test_the_upscaler_is_checked_and_loaded_as_the_sd_sr_stage(tiny_sd, upscaler):
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler

    check_stage_dir(upscaler, "sr")
    cascade = load_cascade(tiny_sd, upscaler)
    assert cascade.family == "sd" and cascade.sr_dir == upscaler
    assert isinstance(cascade.sr_vae, AutoencoderKL) and cascade.sr_vae is not cascade.vae
    assert isinstance(cascade.sr_scheduler, DDIMScheduler)
    assert cascade.sr_scheduler.config.prediction_type == "v_prediction"
    assert isinstance(cascade.sr_noising_scheduler, DDPMScheduler)
    # Its own text encoder (24 wide; the base's is 32), its training sizes its own: 16 px in, 64 px out.
    assert cascade.sr_text_encoder.config.hidden_size == 24 and cascade.text_encoder.config.hidden_size == 32
    assert (cascade.sr_input_size, cascade.sr_size, cascade.base_size) == (16, 64, 32)


def test_our_upscale_loop_draws_what_the_upscale_pipeline_draws(upscaler):
    from diffusers import StableDiffusionUpscalePipeline

    from dreambooth_fast.sample import sample_upscale, torch_unet_fn
    from dreambooth_fast.sd import decode_latents
    from dreambooth_fast.text import encode_negative, encode_prompts

    pipe = StableDiffusionUpscalePipeline.from_pretrained(upscaler, local_files_only=True)
    low = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def generators():
        return [torch.Generator().manual_seed(k) for k in range(2)]

    theirs = pipe(["a dog"] * 2, image=low / 2 + 0.5, num_inference_steps=3, guidance_scale=9.0, noise_level=20,
                  output_type="pt", generator=generators()).images
    cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a dog"] * 2)
    latents = sample_upscale(torch_unet_fn(pipe.unet), pipe.scheduler, pipe.low_res_scheduler, low, cond,
                             encode_negative(pipe.tokenizer, pipe.text_encoder), channels=4, steps=3,
                             guidance_scale=9.0, noise_level=20, generator=generators(), progress=False)
    ours = decode_latents(pipe.vae, latents)
    assert ours.shape == (2, 3, 64, 64)
    torch.testing.assert_close(ours / 2 + 0.5, theirs, rtol=1e-4, atol=1e-5)


def test_train_base_and_sr_with_prior_writes_what_the_upscale_pipeline_loads(tiny_sd, upscaler, subject_dir,
                                                                            tmp_path):
    from diffusers import StableDiffusionUpscalePipeline

    out = tmp_path / "run"
    result = train(tiny_sd, subject_dir, out, "--sr-model", upscaler)
    assert result.exit_code == 0, result.output
    run = json.loads((out / "dreambooth.json").read_text())
    assert run["stages"] == ["base", "sr"] and run["source_sr_model"] == str(upscaler)
    # Class pairs: the base's class image, and the frozen upscaler's 4x of it brought to the upscaler's input size.
    class_dir = run["class_images"]
    assert Image.open(f"{class_dir}/base/0000.png").size == (32, 32)
    assert Image.open(f"{class_dir}/sr/0000.png").size == (64, 64)
    key = json.loads(open(f"{class_dir}/key.json").read())
    assert key["sr_unet"] and key["sr_vae"] and key["sr_text_encoder"] and key["sr_low_res_scheduler"]
    assert (key["sr_guidance_scale"], key["sr_noise_level"]) == (9.0, 20)  # the upscale pipeline's defaults
    # Both UNets changed; the upscaler's other parts are its own, in stage_2/.
    for tuned_dir, source in ((out, tiny_sd), (out / "stage_2", upscaler)):
        tuned, original = unet_weights(tuned_dir), unet_weights(source)
        assert any(not torch.equal(tuned[k], original[k]) for k in original)
    for part in ("vae/config.json", "text_encoder/config.json", "model_index.json",
                 "low_res_scheduler/scheduler_config.json"):
        assert (out / "stage_2" / part).read_bytes() == (upscaler / part).read_bytes()
    pipe = StableDiffusionUpscalePipeline.from_pretrained(out / "stage_2", local_files_only=True)
    image = pipe("a dog", image=torch.rand(1, 3, 16, 16), num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    # dbfast generate: base -> VAE decode -> x4 upscaler -> its VAE decode; --stages base stops after the base.
    samples = tmp_path / "samples"
    args = ["generate", "a [V] dog", "--model", out, "-n", "2", "--steps", "2", "--sr-steps", "2", "--device", "cpu"]
    assert dbfast(*args, "--out", samples).exit_code == 0
    assert {Image.open(p).size for p in samples.glob("image-*.png")} == {(128, 128)}  # 32 px base, 4x
    assert dbfast(*args, "--stages", "base", "--out", tmp_path / "base").exit_code == 0
    assert Image.open(tmp_path / "base" / "image-0000.png").size == (32, 32)
    assert_refused(dbfast(*args, "--noise-level", "351"), "--noise-level 351", "0 to 350")
    assert_refused(dbfast(*args, "--backend", "trt"), "--backend trt", NO_TENSORRT)


def test_the_sr_step_sees_the_low_res_subject_beside_latents_at_the_noise_level(tiny_sd, upscaler, subject_dir,
                                                                               tmp_path, monkeypatch):
    """Like IF's stage II (tests/test_train_sr.py): the real low-res photo, noised by low_res_scheduler at
    --sr-noise-level, which is the upscaler's noise_level as it is and the UNet's class label."""
    seen = []
    loss = StageTrainer.loss

    def recording_loss(self):
        forward = self.unet.forward

        def spy(sample, timestep, *args, class_labels=None, **kwargs):
            seen.append((self.stage, sample.detach().clone(), class_labels))
            return forward(sample, timestep, *args, class_labels=class_labels, **kwargs)

        self.unet.forward = spy
        try:
            return loss(self)
        finally:
            del self.unet.forward

    monkeypatch.setattr(StageTrainer, "loss", recording_loss)
    out = tmp_path / "run"
    result = train(tiny_sd, subject_dir, out, "--sr-model", upscaler, "--stages", "sr", "--no-prior", "--steps", "1",
                   "--batch-size", "4", "--sr-noise-level", "5")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "dreambooth.json").read_text())["stages"] == ["sr"]
    stage, sample, class_labels = seen[0]
    assert stage == "sr" and sample.shape == (4, 7, 16, 16)
    assert torch.equal(class_labels, torch.full((4,), 5, dtype=torch.long))
    low_res = data.prepare(data.load_subject_images(subject_dir), 16)
    conditioning = sample[:, 4:]
    distances = torch.cdist(conditioning.flatten(1), low_res.flatten(1)) / conditioning[0].numel() ** 0.5
    assert distances.min(dim=1).values.max() < 0.05  # level 5 of the DDPM schedule: noise std ~0.02
    assert all(torch.equal(v, unet_weights(tiny_sd)[k]) for k, v in unet_weights(out).items())  # base untouched


def test_lora_on_the_upscaler_writes_an_adapter_its_pipeline_loads(tiny_sd, upscaler, subject_dir, tmp_path):
    from diffusers import StableDiffusionUpscalePipeline

    out = tmp_path / "lora"
    result = train(tiny_sd, subject_dir, out, "--sr-model", upscaler, "--stages", "sr", "--lora-rank", "4",
                   "--no-prior", "--lr", "1e-2")
    assert result.exit_code == 0, result.output
    assert (out / "stage_2" / LORA_WEIGHTS).is_file()
    assert all(torch.equal(v, unet_weights(upscaler)[k]) for k, v in unet_weights(out / "stage_2").items())
    pipe = StableDiffusionUpscalePipeline.from_pretrained(out / "stage_2", local_files_only=True)
    inputs = dict(sample=torch.randn(1, 7, 16, 16, generator=torch.Generator().manual_seed(0)), timestep=500,
                  encoder_hidden_states=torch.randn(1, 77, 24, generator=torch.Generator().manual_seed(1)),
                  class_labels=torch.tensor([20]))
    before = pipe.unet(**inputs).sample
    pipe.load_lora_weights(out / "stage_2", weight_name=LORA_WEIGHTS)
    assert not torch.allclose(before, pipe.unet(**inputs).sample)
    # generate applies the adapter (models.load_unet merges it)
    result = dbfast("generate", "a [V] dog", "--model", out, "-n", "1", "--steps", "2", "--sr-steps", "2",
                    "--device", "cpu", "--out", tmp_path / "samples")
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_ctrl_c_in_the_upscaler_stage_then_resume_is_bitwise_identical(tiny_sd, upscaler, subject_dir, tmp_path,
                                                                       monkeypatch):
    common = ["--sr-model", upscaler, "--steps", "4", "--checkpoint-every", "100", "--flip"]
    straight = tmp_path / "straight"
    assert train(tiny_sd, subject_dir, straight, *common).exit_code == 0
    step = StageTrainer.optimizer_step

    def interrupted_in_sr(self):
        if self.stage == "sr" and self.step == 2:
            raise KeyboardInterrupt
        return step(self)

    out = tmp_path / "run"
    monkeypatch.setattr(StageTrainer, "optimizer_step", interrupted_in_sr)
    assert_refused(train(tiny_sd, subject_dir, out, *common), "interrupted at sr step 2", "--resume")
    monkeypatch.setattr(StageTrainer, "optimizer_step", step)
    result = train(tiny_sd, subject_dir, out, *common, "--resume")
    assert result.exit_code == 0, result.output
    for stage in (out, out / "stage_2"):
        reference = unet_weights(straight / stage.relative_to(out))
        assert all(torch.equal(v, reference[k]) for k, v in unet_weights(stage).items())


def test_an_sd_output_with_its_upscaler_trains_both_stages_by_default(tiny_sd, upscaler, subject_dir, tmp_path):
    first = tmp_path / "first"
    assert train(tiny_sd, subject_dir, first, "--sr-model", upscaler, "--stages", "sr", "--no-prior",
                 "--steps", "1").exit_code == 0
    again = tmp_path / "again"
    result = train(first, subject_dir, again, "--no-prior", "--steps", "1", "--validation-prompt", "a [V] dog",
                   "--validation-every", "1")
    assert result.exit_code == 0, result.output
    assert json.loads((again / "dreambooth.json").read_text())["stages"] == ["base", "sr"]
    # The SR validation grid: the subject's low-res images upscaled by the tuned upscaler, 64 px each.
    assert Image.open(again / "validation" / "sr-step-000001.png").size == (512, 256)  # 2 x 64 px, enlarged 4x


def _copy(model, tmp_path, name="model"):
    return shutil.copytree(model, tmp_path / name)


BAD_UPSCALERS = {
    "no low_res_scheduler": (lambda m: shutil.rmtree(m / "low_res_scheduler"), ["missing low_res_scheduler"]),
    "unet without the image channels": (lambda m: edit_json(m / "unet" / "config.json", in_channels=4),
                                        ["4 input channels", "plus 3 of the low-res image"]),
    "unet without noise-level classes": (lambda m: edit_json(m / "unet" / "config.json", num_class_embeds=None),
                                         ["num_class_embeds", "not an x4 upscaler"]),
    "text encoder of another model": (lambda m: edit_json(m / "unet" / "config.json", cross_attention_dim=32),
                                      ["32-wide text embeddings", "different models"]),
    "max_noise_level past the classes": (lambda m: edit_json(m / "model_index.json", max_noise_level=1000),
                                         ["max_noise_level 1000"]),
}


@pytest.mark.parametrize("case", list(BAD_UPSCALERS))
def test_a_bad_upscaler_is_one_line_before_anything_is_written(tiny_sd, upscaler, subject_dir, tmp_path, case):
    model = _copy(upscaler, tmp_path)
    breaks, words = BAD_UPSCALERS[case]
    breaks(model)
    out = tmp_path / "run"
    assert_refused(train(tiny_sd, subject_dir, out, "--sr-model", model), *words, out=out)


def test_sr_stages_of_the_wrong_family_and_bad_options_are_refused(tiny_sd, tiny_cascade, upscaler, subject_dir,
                                                                  tmp_path):
    out = tmp_path / "run"
    cases = [
        (train(tiny_sd, subject_dir, out, "--sr-model", tiny_cascade / "stage_2"), ["x4 upscaler", "not an IF stage"]),
        (train(tiny_cascade, subject_dir, out, "--sr-model", upscaler), ["x4 upscaler", "IF stage II"]),
        (train(tiny_sd, subject_dir, out, "--sr-model", tiny_sd), ["text-to-image model, not an SR stage"]),
        (train(tiny_sd, subject_dir, out, "--sr-model", upscaler, "--sr-noise-level", "351"),
         ["--sr-noise-level 351", "0 to 350"]),
        (train(tiny_sd, subject_dir, out, "--sr-model", upscaler, "--class-backend", "trt"), [NO_TENSORRT]),
        (train(upscaler, subject_dir, out), ["x4 upscaler", "--sr-model"]),
    ]
    for result, words in cases:
        assert_refused(result, *words, out=out)


@pytest.mark.parametrize("family", ["sd", "if"])
def test_an_explicit_sr_stage_the_model_lacks_is_one_line_on_both_families(family, tiny_sd, tiny_cascade,
                                                                           subject_dir, tmp_path):
    """--stages base,sr given is not the default: without an SR stage it is refused, on SD as on IF (the default
    trains the base alone: tests/test_sd_export.py)."""
    model = tiny_sd if family == "sd" else shutil.copytree(tiny_cascade, tmp_path / "base-only",
                                                           ignore=shutil.ignore_patterns("stage_2"))
    out = tmp_path / "run"
    for stages in ("base,sr", "sr"):
        assert_refused(train(model, subject_dir, out, "--stages", stages), f"--stages {stages}", "--sr-model",
                       out=out)
    assert_refused(dbfast("generate", "a dog", "--model", model, "--stages", "base,sr"), "--sr-model")


def test_the_tensorrt_profile_of_the_upscaler_comes_from_its_config():
    """stabilityai/stable-diffusion-x4-upscaler's unet/config.json values: 7 channels in, 128 latents nominal,
    OpenCLIP-H width, 1000 noise-level classes: the profile has class_labels; the graph's side is dynamic (x 8)."""
    from dreambooth_fast.export.onnx_export import unet_spec
    from dreambooth_fast.export.profiles import BatchSizes, profile_shapes

    config = SimpleNamespace(in_channels=7, sample_size=128, cross_attention_dim=1024, encoder_hid_dim=None,
                             class_embed_type=None, num_class_embeds=1000, block_out_channels=[256, 512, 512, 1024])
    spec = unet_spec(SimpleNamespace(config=config), text_length=77)
    assert spec.has_class_labels and spec.size_multiple == 8
    assert profile_shapes(spec, BatchSizes(1, 8, 16)) == {
        "sample": tuple((b, 7, 128, 128) for b in (1, 8, 16)),
        "timestep": ((1,), (8,), (16,)),
        "encoder_hidden_states": tuple((b, 77, 1024) for b in (1, 8, 16)),
        "class_labels": ((1,), (8,), (16,)),
    }


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs the onnx extra")
def test_the_upscaler_exports_to_onnx_with_parity_and_generates_on_it(tiny_sd, upscaler, subject_dir, tmp_path):
    import onnx

    from dreambooth_fast.export import make_unet_runner
    from dreambooth_fast.export.manifest import manifest_path, read_manifest
    from dreambooth_fast.export.onnx_export import OUTPUT_NAME, UNetGraph
    from dreambooth_fast.export.parity import TOLERANCES

    out = tmp_path / "run"
    assert train(tiny_sd, subject_dir, out, "--sr-model", upscaler, "--no-prior", "--steps", "1").exit_code == 0
    result = dbfast("export", "--model", out, "--onnx")
    assert result.exit_code == 0, result.output
    assert "sr: ONNX fp32 (ONNX Runtime, CPU) parity vs PyTorch fp32: batch 1" in result.output
    path = out / "export" / "sr" / "unet.fp32.onnx"
    manifest = read_manifest(manifest_path(path))
    assert manifest["family"] == "sd" and manifest["stage"] == "sr"
    assert manifest["inputs"] == {"sample": ["batch", 7, "side", "side"], "timestep": ["batch"],
                                  "encoder_hidden_states": ["batch", 77, 24], "class_labels": ["batch"]}
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in onnx.load(str(path)).graph.output}
    assert dims[OUTPUT_NAME][:2] == ["batch", 4]
    # The graph at the size generation feeds it (the 32 px base image: 32 latents), not only the nominal 16.
    runner = make_unet_runner("onnx", "sr", out / "export")
    graph = UNetGraph(load_unet(out / "stage_2"))
    inputs = dict(sample=torch.randn(2, 7, 32, 32), timestep=torch.tensor([999.0, 10.0]),
                  encoder_hidden_states=torch.randn(2, 77, 24), class_labels=torch.tensor([20.0, 0.0]))
    with torch.no_grad():
        assert (runner(**inputs) - graph(**inputs)).abs().max() < TOLERANCES["fp32"].max_abs
    args = ["generate", "a [V] dog", "--model", out, "-n", "2", "--steps", "2", "--sr-steps", "2", "--device", "cpu"]
    assert dbfast(*args, "--out", tmp_path / "torch").exit_code == 0
    result = dbfast(*args, "--backend", "onnx", "--out", tmp_path / "onnx")
    assert result.exit_code == 0, result.output
    for name in ("image-0000.png", "image-0001.png"):
        a, b = (np.asarray(Image.open(tmp_path / d / name), int) for d in ("torch", "onnx"))
        assert a.shape == (128, 128, 3) and np.abs(a - b).max() <= 1


def test_a_run_saved_with_the_old_default_stages_resumes_with_the_new_default():
    """Runs written before --stages had a default of its own saved it as base,sr; resuming one without --stages
    is not a change of options."""
    from dreambooth_fast.config import TrainConfig
    from dreambooth_fast.rundir import check_resume_config

    check_resume_config(TrainConfig(), {"stages": ["base", "sr"]})
    with pytest.raises(Exception, match="stages"):
        check_resume_config(TrainConfig(), {"stages": ["base"]})


def test_eval_generation_runs_base_then_the_upscaler(tiny_sd, upscaler, tmp_path):
    """dbfast eval's generation (the protocol prompts) on SD with the x4 upscaler: 32 px base images, 128 px out."""
    from dreambooth_fast.evaluate.protocol import generate_eval_images

    paths = generate_eval_images(tiny_sd, ["a dog"], 2, tmp_path / "eval", sr_model_dir=upscaler, device="cpu",
                                 base_steps=2, sr_steps=2, progress=False)
    assert {Image.open(p).size for p in paths[0]} == {(128, 128)}
