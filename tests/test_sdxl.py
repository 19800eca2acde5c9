"""SDXL base (issue 19, item 8) on a tiny random SDXL model built here (toy/tiny_sdxl.py): the layout detected and
checked, both encoders' prompts with the pooled embedding and time ids as StableDiffusionXLPipeline makes them, our
sampler against the pipeline's, DreamBooth on VAE latents with and without prior, LoRA, resume, generate, the
output loaded by diffusers, and the UNet through ONNX."""

import json

import pytest
import torch
from runs import (
    assert_bad_layout_refused,
    assert_refused,
    dbfast,
    edit_json,
    interrupted_then_resumed,
    remove,
    train,
    unet_weights,
)

from dreambooth_fast.identifier import choose_identifier
from dreambooth_fast.lora import LORA_WEIGHTS
from dreambooth_fast.models import check_stage_dir, load_cascade, load_tokenizer, model_family
from dreambooth_fast.sd import decode_latents, encode_latents
from dreambooth_fast.text import encode_negative, encode_prompts
from dreambooth_fast.toy.tiny_sdxl import SDXL_VAE_SCALING, build_tiny_sdxl


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    """32 px images, 8 px latents; text encoders 32 + 32 wide (cross-attention 64), pooled 32, time ids x 8."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "sdxl")


@pytest.fixture(scope="module")
def pipe(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)


# -- the layout ----------------------------------------------------------------------------------------------


def test_the_family_is_read_from_model_index_and_the_model_loads(tiny_sdxl):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler

    assert model_family(tiny_sdxl) == "sdxl"
    check_stage_dir(tiny_sdxl, "base")
    cascade = load_cascade(tiny_sdxl, device="cpu", dtype=torch.bfloat16)
    assert cascade.family == "sdxl" and cascade.latent and isinstance(cascade.vae, AutoencoderKL)
    assert cascade.vae.dtype == torch.float32  # SDXL's VAE overflows in fp16: always loaded in fp32
    assert cascade.vae.config.scaling_factor == SDXL_VAE_SCALING
    assert cascade.vae_scale_factor == 4 and cascade.base_size == 32
    assert isinstance(cascade.base_scheduler, EulerDiscreteScheduler)
    assert cascade.sr_unet is None and cascade.sr_dir is None


BAD_LAYOUTS = {
    "no text_encoder_2": (lambda m: remove(m / "text_encoder_2"), ["missing text_encoder_2", "SDXL"]),
    "no tokenizer_2": (lambda m: remove(m / "tokenizer_2"), ["missing tokenizer_2"]),
    "no text_encoder_2 weights": (lambda m: remove(m / "text_encoder_2" / "model.safetensors"),
                                  ["no weight files", "text_encoder_2"]),
    "no second vocabulary": (lambda m: remove(m / "tokenizer_2" / "tokenizer.json"),
                             ["tokenizer_2 has no CLIP BPE vocabulary"]),
    "encoder 2 without projection": (
        lambda m: edit_json(m / "model_index.json", text_encoder_2=["transformers", "CLIPTextModel"]),
        ["CLIPTextModel as text_encoder_2", "CLIPTextModelWithProjection"]),
    "an SD unet": (lambda m: edit_json(m / "unet" / "config.json", addition_embed_type=None),
                   ["addition_embed_type None", "'text_time'"]),
    "text widths of another model": (lambda m: edit_json(m / "unet" / "config.json", cross_attention_dim=2048),
                                     ["2048", "32 + 32", "different models"]),
    "pooled width of another model": (
        lambda m: edit_json(m / "unet" / "config.json", projection_class_embeddings_input_dim=2816),
        ["takes 2816", "pooled 32 plus 6 time ids x 8 make 80", "different models"]),
    "vae of another model": (lambda m: edit_json(m / "vae" / "config.json", latent_channels=16),
                             ["16 latent channels"]),
    "the refiner": (lambda m: edit_json(m / "model_index.json", _class_name="StableDiffusionXLImg2ImgPipeline"),
                    ["StableDiffusionXLImg2ImgPipeline is not supported", "refiner"]),
}


@pytest.mark.parametrize("case", list(BAD_LAYOUTS))
def test_every_bad_layout_is_one_line_before_anything_is_written(tiny_sdxl, subject_dir, tmp_path, case):
    assert_bad_layout_refused(tiny_sdxl, *BAD_LAYOUTS[case], subject_dir, tmp_path)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--sr-model", "."], ["--sr-model", "no SR stage", "refiner"]),
        (["--stages", "sr"], ["--stages sr", "no SR stage", "--stages base"]),
        (["--class-sampler", "smart27"], ["--class-sampler smart27", "IF timestep preset"]),
        (["--train-text-encoder"], ["--train-text-encoder", "not supported on SDXL"]),
    ],
    ids=["sr-model", "stages-sr", "if-preset", "train-text-encoder"],
)
def test_options_that_do_not_apply_to_sdxl_are_refused(tiny_sdxl, subject_dir, tmp_path, options, words):
    out = tmp_path / "run"
    assert_refused(train(tiny_sdxl, subject_dir, out, *options), *words, out=out)


# -- prompts, the identifier, the sampler ----------------------------------------------------------------------


def test_prompts_are_encoded_as_stable_diffusion_xl_pipeline_encodes_them(tiny_sdxl, pipe):
    from dreambooth_fast.sdxl import unet_kwargs

    cascade = load_cascade(tiny_sdxl, device="cpu", with_unets=False)
    prompts = ["a dt dog", "A photo of a dog on the beach"]
    ours = encode_prompts(cascade.tokenizer, cascade.text_encoder, prompts)
    theirs, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                                   do_classifier_free_guidance=True)
    ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, text_encoder_projection_dim=32)
    # What the UNet gets from our embedding is what the pipeline gives it, bit for bit.
    got = unet_kwargs(pipe.unet.config, ours)
    assert ours.shape == (2, 77 + 1, 64)
    torch.testing.assert_close(got["encoder_hidden_states"], theirs, rtol=0, atol=0)
    torch.testing.assert_close(got["added_cond_kwargs"]["text_embeds"], pooled, rtol=0, atol=0)
    torch.testing.assert_close(got["added_cond_kwargs"]["time_ids"], ids.expand(2, -1), rtol=0, atol=0)
    # The negative: force_zeros_for_empty_prompt (SDXL base's setting) makes it zeros, with the same time ids.
    assert json.loads((tiny_sdxl / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is True
    got = unet_kwargs(pipe.unet.config, encode_negative(cascade.tokenizer, cascade.text_encoder))
    torch.testing.assert_close(got["encoder_hidden_states"], negative[:1], rtol=0, atol=0)
    torch.testing.assert_close(got["added_cond_kwargs"]["text_embeds"], negative_pooled[:1], rtol=0, atol=0)
    assert not negative.any() and torch.equal(got["added_cond_kwargs"]["time_ids"], ids)
    with pytest.warns(UserWarning, match="longer than 77 tokens; this part was cut"):
        encode_prompts(cascade.tokenizer, cascade.text_encoder, [" ".join(["dog"] * 80)])


def test_the_identifier_round_trips_in_both_tokenizers(tiny_sdxl):
    from transformers import CLIPTokenizer

    first = load_tokenizer(tiny_sdxl)
    second = CLIPTokenizer.from_pretrained(tiny_sdxl / "tokenizer_2", local_files_only=True)
    assert second.pad_token == "!" and first.pad_token != "!"  # as in SDXL: one vocabulary, another pad token
    for n in (1, 2):
        word = choose_identifier(first, n_tokens=n, seed=3)
        for tokenizer in (first, second):
            ids = tokenizer.encode(f"a {word} dog", add_special_tokens=False)[1:-1]
            assert len(ids) <= n and tokenizer.decode(ids) == word


def test_an_identifier_tokenizer_2_splits_otherwise_is_a_warning_or_refused(tiny_sdxl, tmp_path):
    """A tokenizer_2 with another (coarser) vocabulary: one rare token of tokenizer/ is other pieces there (a
    warning); three of them split into more than 3 pieces (refused in one line)."""
    from transformers import CLIPTokenizer

    from dreambooth_fast.errors import UserError
    from dreambooth_fast.sdxl import check_second_tokenizer
    from dreambooth_fast.toy.if_layout import tokenizer_text
    from dreambooth_fast.toy.tiny_sd import train_clip_bpe

    cascade = load_cascade(tiny_sdxl, device="cpu", with_unets=False)
    coarse = train_clip_bpe(tmp_path / "bpe", tokenizer_text(1), 30)
    first, _ = cascade.text_encoder.tokenizers
    cascade.text_encoder.tokenizers = (first, CLIPTokenizer(str(coarse / "vocab.json"), str(coarse / "merges.txt")))
    assert check_second_tokenizer(cascade.text_encoder, "a") == []  # a byte character: the same in both
    one = choose_identifier(first, n_tokens=1)
    assert [w for w in check_second_tokenizer(cascade.text_encoder, one) if "in tokenizer_2" in w]
    with pytest.raises(UserError, match="tokenizer_2: --identifier .* splits into"):
        check_second_tokenizer(cascade.text_encoder, choose_identifier(first, n_tokens=3))


def test_our_sampler_draws_what_stable_diffusion_xl_pipeline_draws(tiny_sdxl, pipe):
    from dreambooth_fast.sample import generate_cascade

    cascade = load_cascade(tiny_sdxl, device="cpu")
    ours = generate_cascade(cascade, ["a dog"] * 2, stages=("base",), base_steps=3, base_guidance=7.5,
                            generator=[torch.Generator().manual_seed(k) for k in range(2)], progress=False)["base"]
    theirs = pipe(["a dog"] * 2, num_inference_steps=3, guidance_scale=7.5, height=32, width=32, output_type="pt",
                  generator=[torch.Generator().manual_seed(k) for k in range(2)]).images
    torch.testing.assert_close(ours / 2 + 0.5, theirs, rtol=1e-4, atol=1e-5)


def test_the_vae_runs_in_float32_under_a_float16_autocast(tiny_sdxl):
    """SDXL's VAE overflows in fp16: encode and decode stay in the VAE's fp32 under the run's autocast."""
    vae = load_cascade(tiny_sdxl, device="cpu", with_text_encoder=False, with_unets=False).vae
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.autocast("cpu", dtype=torch.float16):
        latents = encode_latents(vae, images)
        decoded = decode_latents(vae, latents)
    torch.testing.assert_close(latents, encode_latents(vae, images), rtol=0, atol=0)
    assert decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, decode_latents(vae, latents), rtol=0, atol=0)


# -- training --------------------------------------------------------------------------------------------------


def test_train_with_prior_writes_a_model_stable_diffusion_xl_pipeline_loads(tiny_sdxl, subject_dir, tmp_path,
                                                                            monkeypatch):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from PIL import Image

    calls = []
    forward = UNet2DConditionModel.forward

    def recording(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        if self.training:
            calls.append((sample.shape[0], encoder_hidden_states.shape, kwargs["added_cond_kwargs"]))
        return forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording)
    out = tmp_path / "run"
    result = train(tiny_sdxl, subject_dir, out)
    assert result.exit_code == 0, result.output
    # The step: subject and prior rows alike with the tokens, pooled embedding and the 32 px time ids.
    assert len(calls) == 2
    for rows, tokens, added in calls:
        assert rows == 2 and tokens == (2, 77, 64) and added["text_embeds"].shape == (2, 32)
        assert added["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    run = json.loads((out / "dreambooth.json").read_text())
    assert run["stages"] == ["base"] and run["instance_prompts"] == [f"a {run['identifier']} dog"]
    class_dir = run["class_images"]
    assert Image.open(f"{class_dir}/base/0001.png").size == (32, 32)
    key = json.loads(open(f"{class_dir}/key.json").read())
    assert key["vae"] and key["scheduler"] and key["text_encoder_2"] and key["sr_unet"] is None
    tuned, original = unet_weights(out), unet_weights(tiny_sdxl)
    assert any(not torch.equal(tuned[k], original[k]) for k in original)
    for part in ("vae", "text_encoder", "text_encoder_2", "tokenizer_2"):
        assert {p.name for p in (out / part).iterdir()} == {p.name for p in (tiny_sdxl / part).iterdir()}
    pipe = StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)
    images = pipe("a dog", num_inference_steps=2, height=32, width=32, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_train_without_prior_validate_and_generate(tiny_sdxl, subject_dir, tmp_path):
    from PIL import Image

    from dreambooth_fast.evaluate.protocol import generate_eval_images

    out = tmp_path / "run"
    result = train(tiny_sdxl, subject_dir, out, "--no-prior", "--min-snr-gamma", "5", "--precision", "bf16",
                   "--validation-prompt", "a [V] dog", "--validation-every", "2")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "dreambooth.json").read_text())["class_images"] is None
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["base-sheet.png", "base-step-000002.png"]
    samples = tmp_path / "samples"
    result = dbfast("generate", "a [V] dog", "--model", out, "-n", "2", "--steps", "2", "--device", "cpu",
                    "--out", samples)
    assert result.exit_code == 0, result.output
    assert len(list(samples.glob("image-*.png"))) == 2
    result = dbfast("generate", "a [V] dog", "--model", out, "-n", "1", "--steps", "2", "--sampler", "dpm++",
                    "--device", "cpu", "--out", samples)
    assert result.exit_code == 0, result.output
    paths = generate_eval_images(out, ["a dog"], 1, tmp_path / "eval", device="cpu", base_steps=2, progress=False)
    assert Image.open(paths[0][0]).size == (32, 32)  # dbfast eval's generation


def test_lora_writes_an_adapter_that_load_lora_weights_loads(tiny_sdxl, subject_dir, tmp_path, pipe):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "lora"
    result = train(tiny_sdxl, subject_dir, out, "--lora-rank", "4", "--no-prior", "--lr", "1e-2")
    assert result.exit_code == 0, result.output
    assert (out / LORA_WEIGHTS).is_file()
    assert all(torch.equal(v, unet_weights(tiny_sdxl)[k]) for k, v in unet_weights(out).items())
    tuned = StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1))
    added = {"text_embeds": torch.randn(1, 32, generator=torch.Generator().manual_seed(2)),
             "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    before = tuned.unet(latents, 500, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
    tuned.load_lora_weights(out, weight_name=LORA_WEIGHTS)
    after = tuned.unet(latents, 500, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
    assert not torch.allclose(before, after)


def test_prior_mode_predictions_with_lora(tiny_sdxl, subject_dir, tmp_path):
    """No class images: the UNet with its adapter off predicts the prior rows' targets, with SDXL's conditioning."""
    out = tmp_path / "run"
    result = train(tiny_sdxl, subject_dir, out, "--prior-mode", "predictions", "--lora-rank", "4")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "dreambooth.json").read_text())["class_images"] is None


@pytest.mark.slow
def test_onnx_export_takes_the_packed_embedding_and_generates_what_torch_generates(tiny_sdxl, subject_dir, tmp_path):
    """The exported graph unpacks the pooled embedding and time ids itself: SD's three inputs, 78 text rows."""
    import numpy as np
    import onnx
    from PIL import Image

    from dreambooth_fast.export.manifest import manifest_path, read_manifest

    out = tmp_path / "run"
    assert train(tiny_sdxl, subject_dir, out, "--no-prior").exit_code == 0
    result = dbfast("export", "--model", out, "--onnx")
    assert result.exit_code == 0, result.output
    assert "base: ONNX fp32 (ONNX Runtime, CPU) parity vs PyTorch fp32: batch 1" in result.output
    path = out / "export" / "base" / "unet.fp32.onnx"
    graph = onnx.load(str(path)).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    assert dims == {"sample": ["batch", 4, 8, 8], "timestep": ["batch"], "encoder_hidden_states": ["batch", 78, 64]}
    assert read_manifest(manifest_path(path))["family"] == "sdxl"
    args = ["a [V] dog", "--model", out, "-n", "2", "--steps", "3", "--device", "cpu"]
    for backend in ("torch", "onnx"):
        result = dbfast("generate", *args, "--backend", backend, "--out", tmp_path / backend)
        assert result.exit_code == 0, result.output
    for name in ("image-0000.png", "image-0001.png"):
        a, b = (np.asarray(Image.open(tmp_path / d / name), int) for d in ("torch", "onnx"))
        assert a.shape == (32, 32, 3) and np.abs(a - b).max() <= 1  # one grey level: rounding


def test_ctrl_c_then_resume_is_bitwise_identical(tiny_sdxl, subject_dir, tmp_path, monkeypatch):
    options = ["--steps", "4", "--checkpoint-every", "100", "--batch-size", "2", "--flip"]
    interrupted_then_resumed(tiny_sdxl, subject_dir, tmp_path, monkeypatch, options, stop_after=2)
