"""Stable Diffusion (issue 19, item 6 and leftovers) on the tiny SD model: the UNet through `dbfast export --onnx`
with the IF UNet's parity check, `dbfast generate --backend onnx` (base on ONNX Runtime, VAE decode in PyTorch)
against torch, missing and stale exports refused, class images on --class-backend onnx, the TensorRT profile shapes
of SD 1.5 and 2.1 UNets, validation grids while training, and no stage II note."""

import importlib.util
import json
import shutil
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from runs import assert_refused, dbfast, train
from safetensors.torch import load_file, save_file

from dreambooth_fast.export import make_unet_runner
from dreambooth_fast.export.manifest import manifest_path, read_manifest, weights_record
from dreambooth_fast.export.onnx_export import OUTPUT_NAME, unet_spec
from dreambooth_fast.export.parity import TOLERANCES
from dreambooth_fast.export.profiles import BatchSizes, profile_shapes
from dreambooth_fast.export.tensorrt_build import INSTALL_COMMAND
from dreambooth_fast.images import enlarged, make_grid, to_pil
from dreambooth_fast.models import load_cascade
from dreambooth_fast.sample import generate_cascade, sample_base, torch_unet_fn
from dreambooth_fast.sd import decode_latents
from dreambooth_fast.text import encode_negative, encode_prompts


@pytest.fixture(scope="module")
def tuned(tiny_sd, tmp_path_factory):
    """A dbfast train output of the tiny SD model (what users export)."""
    folder = tmp_path_factory.mktemp("sd-export")
    subject = folder / "subject"
    subject.mkdir()
    for i, background in enumerate(["white", "blue", "green", "gray"]):
        Image.new("RGB", (40, 40), background).save(subject / f"{i}.png")
    out = folder / "run"
    result = train(tiny_sd, subject, out, "--no-prior")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def exported(tuned):
    """`dbfast export --model SD_OUTPUT --onnx`, once for this module (into MODEL/export, the default)."""
    result = dbfast("export", "--model", tuned, "--onnx")
    assert result.exit_code == 0, result.output
    assert "base: ONNX fp32 (ONNX Runtime, CPU) parity vs PyTorch fp32: batch 1" in result.output
    return tuned / "export"


def test_export_writes_the_sd_unet_as_a_checked_graph_of_latents_and_clip_embeddings(exported):
    path = exported / "base" / "unet.fp32.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output]}
    assert dims == {"sample": ["batch", 4, 8, 8], "timestep": ["batch"], "encoder_hidden_states": ["batch", 77, 32],
                    OUTPUT_NAME: ["batch", 4, 8, 8]}
    assert sorted(p.name for p in exported.iterdir()) == ["base"]  # no x4 upscaler in this model


def test_manifest_names_the_family_and_parity_is_within_the_if_tolerance(exported, tuned):
    manifest = read_manifest(manifest_path(exported / "base" / "unet.fp32.onnx"))
    assert manifest["family"] == "sd" and manifest["stage"] == "base"
    assert manifest["inputs"] == {"sample": ["batch", 4, 8, 8], "timestep": ["batch"],
                                  "encoder_hidden_states": ["batch", 77, 32]}
    assert manifest["weights_sha256"] == weights_record(tuned)["sha256"]
    assert manifest["tolerance"] == {"max_abs": TOLERANCES["fp32"].max_abs, "min_cosine": TOLERANCES["fp32"].min_cosine}
    assert [p["batch"] for p in manifest["parity"]] == [1, 2]
    for p in manifest["parity"]:
        assert p["max_abs"] <= TOLERANCES["fp32"].max_abs and p["cosine"] >= TOLERANCES["fp32"].min_cosine


def test_onnx_generation_equals_torch_generation_within_the_parity_tolerance(exported, tuned):
    """The base stage on ONNX Runtime, the VAE decode in PyTorch: images in [-1, 1] within 1e-3 of eager torch's."""
    cascade = load_cascade(tuned)
    kwargs = dict(stages=("base",), base_steps=3, base_guidance=7.5, progress=False)
    torch_images = generate_cascade(cascade, ["a dog"] * 2, generator=torch.Generator().manual_seed(3), **kwargs)
    onnx_images = generate_cascade(cascade, ["a dog"] * 2, base_unet_fn=make_unet_runner("onnx", "base", exported),
                                   generator=torch.Generator().manual_seed(3), **kwargs)["base"]
    assert onnx_images.shape == (2, 3, 32, 32)
    assert (onnx_images - torch_images["base"]).abs().max() < TOLERANCES["fp32"].max_abs


def test_dbfast_generate_backend_onnx_writes_what_torch_writes(exported, tuned, tmp_path, monkeypatch):
    from dreambooth_fast import models

    args = ["a [V] dog", "--model", tuned, "-n", "2", "--steps", "3", "--device", "cpu"]
    assert dbfast("generate", *args, "--out", tmp_path / "torch").exit_code == 0

    def no_torch_unet(*args, **kwargs):
        raise AssertionError("the onnx backend loaded a torch UNet")

    monkeypatch.setattr(models, "load_unet", no_torch_unet)
    result = dbfast("generate", *args, "--backend", "onnx", "--out", tmp_path / "onnx")
    assert result.exit_code == 0, result.output
    for name in ("image-0000.png", "image-0001.png"):
        a, b = (np.asarray(Image.open(tmp_path / d / name), int) for d in ("torch", "onnx"))
        assert a.shape == (32, 32, 3) and np.abs(a - b).max() <= 1  # one grey level: rounding


def test_eval_images_on_the_onnx_backend_match_torch(exported, tuned, tmp_path):
    from dreambooth_fast.evaluate import generate_eval_images

    kwargs = dict(base_steps=3, progress=False)
    torch_paths = generate_eval_images(tuned, ["a dog"], 2, tmp_path / "torch", **kwargs)
    onnx_paths = generate_eval_images(tuned, ["a dog"], 2, tmp_path / "onnx", backend="onnx", **kwargs)
    for a, b in zip(torch_paths[0], onnx_paths[0]):
        assert np.abs(np.asarray(Image.open(a), int) - np.asarray(Image.open(b), int)).max() <= 1


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_tensorrt_on_sd_without_tensorrt_is_the_install_line(tuned):
    for args in (["export", "--model", tuned, "--trt"],
                 ["generate", "a dog", "--model", tuned, "-n", "1", "--steps", "2", "--backend", "trt"]):
        assert_refused(dbfast(*args), "TensorRT is not installed", INSTALL_COMMAND)


def test_a_missing_or_stale_sd_export_is_refused_in_one_line(exported, tuned, tmp_path):
    model = shutil.copytree(tuned, tmp_path / "model", ignore=shutil.ignore_patterns("export"))
    args = ["generate", "a [V] dog", "--model", model, "-n", "1", "--steps", "2", "--device", "cpu"]
    assert_refused(dbfast(*args, "--backend", "onnx"), "no base export here",
                   "dbfast export --model MODEL --onnx")
    shutil.copytree(exported, model / "export")
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    name = next(iter(state))
    save_file({**state, name: state[name] + 1}, weights)  # trained further since the export
    assert_refused(dbfast(*args, "--backend", "onnx"), "is stale (weights", "dbfast export --model MODEL --onnx")


def test_class_images_on_the_onnx_backend_need_the_export_and_use_it(exported, tuned, tiny_sd, subject_dir,
                                                                     tmp_path):
    out = tmp_path / "run"
    assert_refused(train(tiny_sd, subject_dir, out, "--class-backend", "onnx"), "no base export here", out=out)
    result = train(tuned, subject_dir, out, "--class-backend", "onnx")
    assert result.exit_code == 0, result.output
    class_dir = json.loads((out / "dreambooth.json").read_text())["class_images"]
    assert Image.open(f"{class_dir}/base/0001.png").size == (32, 32)  # drawn in latents, decoded by the VAE


@pytest.mark.parametrize(
    ("config", "sample", "text"),
    [({"in_channels": 4, "sample_size": 64, "cross_attention_dim": 768}, (4, 64, 64), (77, 768)),  # SD 1.5
     ({"in_channels": 4, "sample_size": 96, "cross_attention_dim": 1024}, (4, 96, 96), (77, 1024))],  # SD 2.1
    ids=["sd15", "sd21"],
)
def test_tensorrt_profile_of_sd_unets_comes_from_their_config(config, sample, text):
    """What build_engine gets for a Stable Diffusion UNet (its unet/config.json values): latent channels and size,
    CLIP's 77 tokens and width, the batch over the UNet profile of prompt batches 1:4:8 (guidance doubles)."""
    unet = SimpleNamespace(config=SimpleNamespace(**config, encoder_hid_dim=None, class_embed_type=None))
    shapes = profile_shapes(unet_spec(unet, text_length=77), BatchSizes(1, 8, 16))
    assert shapes == {"sample": tuple((b, *sample) for b in (1, 8, 16)),
                      "timestep": ((1,), (8,), (16,)),
                      "encoder_hidden_states": tuple((b, *text) for b in (1, 8, 16))}


def test_validation_grids_while_training_sd_are_the_decoded_base_samples(tiny_sd, subject_dir, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_sd, subject_dir, out, "--no-prior", "--validation-prompt", "a [V] dog",
                   "--validation-every", "2")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["base-sheet.png", "base-step-000002.png"]
    # The last grid is the tuned UNet's: 25 steps of the model's scheduler, guidance 7, one generator of the run's
    # seed, latents decoded by the VAE, as the trainer draws it.
    from dreambooth_fast.train import VALIDATION_STEPS

    cascade = load_cascade(out)
    ident = json.loads((out / "dreambooth.json").read_text())["identifier"]
    embeds = encode_prompts(cascade.tokenizer, cascade.text_encoder, [f"a {ident} dog"] * 2)
    negative = encode_negative(cascade.tokenizer, cascade.text_encoder)
    latents = sample_base(torch_unet_fn(cascade.base_unet), cascade.base_scheduler, embeds, negative, size=8,
                          steps=VALIDATION_STEPS, guidance_scale=7.0, generator=torch.Generator().manual_seed(0),
                          progress=False, channels=4)
    expected = np.asarray(enlarged(make_grid(to_pil(decode_latents(cascade.vae, latents)), cols=2)), int)
    grid = np.asarray(Image.open(out / "validation" / "base-step-000002.png"), int)
    assert grid.shape == expected.shape and np.abs(grid - expected).max() <= 1


def test_sd_says_nothing_of_a_stage_ii_when_stages_is_left_at_its_default(tiny_sd, subject_dir, tmp_path):
    """(--stages sr is refused naming the x4 upscaler: tests/test_sd.py.)"""
    result = train(tiny_sd, subject_dir, tmp_path / "run", "--no-prior", "--steps", "1")
    assert result.exit_code == 0, result.output
    assert "stage II" not in result.output and "stage_2" not in result.output


def test_an_if_model_without_stage_ii_still_gets_the_note(capsys):
    from dreambooth_fast.config import TrainConfig
    from dreambooth_fast.train import _pick_stages

    cfg = TrainConfig(model="if-base-only")
    assert _pick_stages(cfg, has_sr=False, family="if") == ["base"]
    assert capsys.readouterr().out == "if-base-only has no stage II (stage_2/): training the base stage only\n"
    assert _pick_stages(cfg, has_sr=False, family="sd") == ["base"]
    assert capsys.readouterr().out == ""
