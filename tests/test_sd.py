"""Stable Diffusion 1.x/2.x (issue 19, first part) on a tiny random SD model built here (toy/tiny_sd.py): the layout
detected and checked, CLIP prompts and the rare-token identifier on a BPE vocabulary trained in the test, DreamBooth
on VAE latents with and without prior, LoRA, resume, v-prediction, and the output loaded by diffusers."""

import json
import re
import shutil

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
from safetensors.torch import load_file, save_file

from dreambooth_fast.identifier import (
    check_identifier,
    choose_identifier,
    find_candidates,
    known_words,
    rare_id_range,
)
from dreambooth_fast.lora import LORA_WEIGHTS
from dreambooth_fast.models import check_stage_dir, load_cascade, load_tokenizer, model_family
from dreambooth_fast.text import encode_negative, encode_prompts
from dreambooth_fast.toy.tiny_sd import build_tiny_sd


@pytest.fixture(scope="module")
def tokenizer(tiny_sd):
    return load_tokenizer(tiny_sd)


# -- the layout ----------------------------------------------------------------------------------------------


def test_the_family_is_read_from_model_index_and_the_model_loads(tiny_sd):
    from diffusers import AutoencoderKL, PNDMScheduler

    assert json.loads((tiny_sd / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert model_family(tiny_sd) == "sd"
    check_stage_dir(tiny_sd, "base")
    cascade = load_cascade(tiny_sd, device="cpu")
    assert cascade.family == "sd" and isinstance(cascade.vae, AutoencoderKL)
    assert cascade.vae_scale_factor == 4 and cascade.base_size == 32  # the UNet's sample_size is the latent's: 8
    assert isinstance(cascade.base_scheduler, PNDMScheduler)  # the pipeline's own sampler
    assert cascade.sr_unet is None and cascade.sr_dir is None


BAD_LAYOUTS = {
    "no vae": (lambda m: remove(m / "vae"), ["missing vae"]),
    "no unet weights": (lambda m: remove(m / "unet" / "diffusion_pytorch_model.safetensors"),
                        ["no weight files", "unet"]),
    "no text encoder config": (lambda m: remove(m / "text_encoder" / "config.json"),
                               ["text_encoder/config.json is missing", "Stable Diffusion"]),
    "no vocabulary": (lambda m: [remove(m / "tokenizer" / "tokenizer.json")], ["no CLIP BPE vocabulary"]),
    "unet of another model": (lambda m: edit_json(m / "unet" / "config.json", in_channels=9),
                              ["9 input channels", "different models"]),
    "text width of another model": (lambda m: edit_json(m / "unet" / "config.json", cross_attention_dim=768),
                                    ["768", "different models"]),
    "unknown scheduler": (lambda m: edit_json(m / "scheduler" / "scheduler_config.json", _class_name="Nope"),
                          ["'Nope'", "not a diffusers scheduler"]),
    "sd named sdxl": (lambda m: edit_json(m / "model_index.json", _class_name="StableDiffusionXLPipeline"),
                      ["not an SDXL", "missing text_encoder_2, tokenizer_2"]),  # SDXL's own: tests/test_sdxl.py
    "upscaler as the model": (
        lambda m: edit_json(m / "model_index.json", _class_name="StableDiffusionUpscalePipeline"), ["x4 upscaler"]),
    "broken model_index": (lambda m: (m / "model_index.json").write_text("{"), ["model_index.json is not valid JSON"]),
}


@pytest.mark.parametrize("case", list(BAD_LAYOUTS))
def test_every_bad_layout_is_one_line_before_anything_is_written(tiny_sd, subject_dir, tmp_path, case):
    assert_bad_layout_refused(tiny_sd, *BAD_LAYOUTS[case], subject_dir, tmp_path)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--stages", "sr"], ["--stages sr", "x4 upscaler", "--sr-model"]),
        (["--class-sampler", "smart27"], ["--class-sampler smart27", "IF timestep preset"]),
    ],
    ids=["stages-sr-without-upscaler", "if-preset"],
)
def test_options_that_do_not_apply_to_sd_are_refused(tiny_sd, subject_dir, tmp_path, options, words):
    """(The x4 upscaler as --sr-model: tests/test_sd_upscale.py.)"""
    out = tmp_path / "run"
    assert_refused(train(tiny_sd, subject_dir, out, *options), *words, out=out)


# -- prompts and the identifier ------------------------------------------------------------------------------


def test_prompts_are_encoded_as_stable_diffusion_pipeline_encodes_them(tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    prompts = ["a dt dog", "A photo of a dog on the beach"]
    ours = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)
    theirs, negative = pipe.encode_prompt(prompts, "cpu", 1, True)
    assert ours.shape == (2, 77, 32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(encode_negative(pipe.tokenizer, pipe.text_encoder), negative[:1], rtol=0, atol=0)
    with pytest.warns(UserWarning, match="longer than 77 tokens; this part was cut"):
        encode_prompts(pipe.tokenizer, pipe.text_encoder, [" ".join(["dog"] * 80)])


def word_ids(tokenizer, word):
    return tokenizer.encode(f"a {word} dog", add_special_tokens=False)[1:-1]


def test_rare_range_is_the_papers_fraction_of_the_bpe_merges(tokenizer):
    merges = len(tokenizer) - 512 - 2  # byte characters alone and with </w>; <|startoftext|>, <|endoftext|>
    assert rare_id_range(tokenizer) == range(512 + round(5000 * merges / 32000), 512 + round(10000 * merges / 32000))


def test_clip_candidates_are_single_word_final_tokens_of_at_most_3_letters_not_words(tokenizer):
    candidates = find_candidates(tokenizer)
    assert len(candidates) >= 5
    for c in candidates:
        assert c.kept and c.id in rare_id_range(tokenizer)
        assert re.fullmatch("[a-z]{1,3}", c.text) and c.piece == c.text + "</w>"
        assert tokenizer.decode([c.id]) == c.text
        assert word_ids(tokenizer, c.text) == [c.id]  # "a xy dog" has xy as this one token
        assert c.text not in known_words()
    rejected = {c.reason for c in find_candidates(tokenizer, include_rejected=True) if not c.kept}
    assert "not this one token in a prompt" in rejected  # mid-word pieces (no </w>)


def test_the_chosen_identifier_round_trips_and_sks_is_refused(tokenizer):
    for n in (1, 2):
        word = choose_identifier(tokenizer, n_tokens=n, seed=3)
        assert check_identifier(tokenizer, word) == [] and len(word_ids(tokenizer, word)) <= n
        assert tokenizer.decode(word_ids(tokenizer, word)) == word
    assert any("known word" in w for w in check_identifier(tokenizer, "sks"))
    assert "sks" not in {c.text for c in find_candidates(tokenizer)}


def test_dbfast_identifier_works_on_a_clip_tokenizer(tiny_sd, tokenizer):
    result = dbfast("identifier", "--model", tiny_sd, "--limit", "3")
    assert result.exit_code == 0, result.output
    assert "merges" in result.output and "</w>" in result.output
    assert f"chosen: {choose_identifier(tokenizer)}" in result.output
    result = dbfast("identifier", "--model", tiny_sd, "--check", "sks")
    assert result.exit_code == 0 and "known word" in result.output and "ks</w>" in result.output


# -- training --------------------------------------------------------------------------------------------------


def test_train_with_prior_writes_a_model_stable_diffusion_pipeline_loads(tiny_sd, subject_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    out = tmp_path / "run"
    result = train(tiny_sd, subject_dir, out)
    assert result.exit_code == 0, result.output
    run = json.loads((out / "dreambooth.json").read_text())
    assert run["stages"] == ["base"] and run["instance_prompts"] == [f"a {run['identifier']} dog"]
    assert run["identifier"] == choose_identifier(load_tokenizer(tiny_sd))
    # Class images: drawn by the SD model in latent space, decoded by its VAE; the cache key names the VAE.
    class_dir = run["class_images"]
    assert Image.open(f"{class_dir}/base/0001.png").size == (32, 32)
    key = json.loads(open(f"{class_dir}/key.json").read())
    assert key["vae"] and key["scheduler"] and key["sr_unet"] is None
    # The UNet changed, the rest is the input model's.
    tuned, original = unet_weights(out), unet_weights(tiny_sd)
    assert any(not torch.equal(tuned[k], original[k]) for k in original)
    for part in ("vae", "text_encoder"):
        assert (out / part / "config.json").read_bytes() == (tiny_sd / part / "config.json").read_bytes()
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    images = pipe("a dog", num_inference_steps=2, height=32, width=32, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_train_without_prior_and_generate(tiny_sd, subject_dir, tmp_path):
    out = tmp_path / "run"
    # Min-SNR weights and the fused GroupNorm + SiLU op (SD's ResNet blocks) on latents too.
    result = train(tiny_sd, subject_dir, out, "--no-prior", "--min-snr-gamma", "5", "--fused-norm")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "dreambooth.json").read_text())["class_images"] is None
    # dbfast generate: the base stage draws latents, the VAE decodes them (no x4 upscaler here: the base alone).
    samples = tmp_path / "samples"
    result = dbfast("generate", "a [V] dog", "--model", out, "-n", "2", "--steps", "2", "--device", "cpu",
                    "--out", samples)
    assert result.exit_code == 0, result.output
    assert len(list(samples.glob("image-*.png"))) == 2
    result = dbfast("generate", "a [V] dog", "--model", out, "-n", "1", "--steps", "2", "--sampler", "dpm++",
                    "--device", "cpu", "--out", samples)
    assert result.exit_code == 0, result.output
    assert_refused(dbfast("generate", "a [V] dog", "--model", out, "--sampler", "fast27"), "IF timestep preset")


def test_our_sampler_draws_what_stable_diffusion_pipeline_draws(tiny_sd):
    from diffusers import StableDiffusionPipeline

    from dreambooth_fast.sample import generate_cascade

    cascade = load_cascade(tiny_sd, device="cpu")
    ours = generate_cascade(cascade, ["a dog"] * 2, stages=("base",), base_steps=3, base_guidance=7.5,
                            generator=[torch.Generator().manual_seed(k) for k in range(2)], progress=False)["base"]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    theirs = pipe(["a dog"] * 2, num_inference_steps=3, guidance_scale=7.5, height=32, width=32, output_type="pt",
                  generator=[torch.Generator().manual_seed(k) for k in range(2)]).images
    torch.testing.assert_close(ours / 2 + 0.5, theirs, rtol=1e-4, atol=1e-5)


def test_lora_writes_an_adapter_that_load_lora_weights_loads(tiny_sd, subject_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "lora"
    result = train(tiny_sd, subject_dir, out, "--lora-rank", "4", "--no-prior", "--lr", "1e-2")
    assert result.exit_code == 0, result.output
    assert (out / LORA_WEIGHTS).is_file()
    assert all(torch.equal(v, unet_weights(tiny_sd)[k]) for k, v in unet_weights(out).items())
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    before = pipe.unet(latents, 500, encoder_hidden_states=embeds).sample
    pipe.load_lora_weights(out, weight_name=LORA_WEIGHTS)
    after = pipe.unet(latents, 500, encoder_hidden_states=embeds).sample
    assert not torch.allclose(before, after)


def test_prior_mode_predictions_with_lora(tiny_sd, subject_dir, tmp_path):
    """No class images: the UNet with its adapter off predicts the prior rows' targets on the subject latents."""
    out = tmp_path / "run"
    result = train(tiny_sd, subject_dir, out, "--prior-mode", "predictions", "--lora-rank", "4")
    assert result.exit_code == 0, result.output
    run = json.loads((out / "dreambooth.json").read_text())
    assert run["class_images"] is None and (out / LORA_WEIGHTS).is_file()


def test_ctrl_c_then_resume_is_bitwise_identical(tiny_sd, subject_dir, tmp_path, monkeypatch):
    options = ["--steps", "4", "--checkpoint-every", "100", "--batch-size", "2", "--flip"]
    interrupted_then_resumed(tiny_sd, subject_dir, tmp_path, monkeypatch, options, stop_after=2)


def test_sd2_style_v_prediction_trains_on_v_targets(tmp_path, subject_dir, monkeypatch):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from dreambooth_fast import train as training

    model = build_tiny_sd(tmp_path / "sd2", prediction_type="v_prediction")
    assert isinstance(load_cascade(model, device="cpu", with_unets=False).base_scheduler, DDIMScheduler)
    seen = []
    add_noise = training.ops.add_noise

    def recording(x0, eps, t, alphas_cumprod, prediction_type="epsilon"):
        seen.append(prediction_type)
        return add_noise(x0, eps, t, alphas_cumprod, prediction_type)

    monkeypatch.setattr(training.ops, "add_noise", recording)
    out = tmp_path / "run"
    result = train(model, subject_dir, out)
    assert result.exit_code == 0, result.output
    assert seen and set(seen) == {"v_prediction"}  # every training step's target is v
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    StableDiffusionPipeline.from_pretrained(out, local_files_only=True)



def test_eval_generation_runs_on_a_stable_diffusion_model(tiny_sd, tmp_path):
    """dbfast eval's generation (the protocol prompts) draws through the SD base and the VAE decode."""
    from PIL import Image

    from dreambooth_fast.evaluate.protocol import generate_eval_images

    paths = generate_eval_images(tiny_sd, ["a dog", "a dog on the beach"], 2, tmp_path / "eval", device="cpu",
                                 base_steps=2, progress=False)
    assert [len(group) for group in paths] == [2, 2]
    assert {Image.open(p).size for group in paths for p in group} == {(32, 32)}


def test_the_class_image_cache_key_names_the_vae(tiny_sd, tmp_path):
    from dreambooth_fast.prior import PriorSettings, cache_key

    settings = PriorSettings("a dog", "ddpm", 2, 7.5, 2, 4.0, 250, False, 0)
    model = shutil.copytree(tiny_sd, tmp_path / "model")
    key = cache_key(load_cascade(model, with_text_encoder=False, with_unets=False), settings)
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    name = next(iter(state))
    save_file({**state, name: state[name] + 1}, weights)  # another VAE decodes other class images from the same latents
    changed = cache_key(load_cascade(model, with_text_encoder=False, with_unets=False), settings)
    assert key["base_unet"] == changed["base_unet"] and key["vae"] != changed["vae"]


def test_a_run_loads_the_tokenizer_once(tiny_sd, subject_dir, tmp_path, monkeypatch):
    """The checks before the run and the run itself share one tokenizer (it was loaded twice)."""
    from transformers import CLIPTokenizer

    loads = []
    original = CLIPTokenizer.from_pretrained
    monkeypatch.setattr(CLIPTokenizer, "from_pretrained",
                        lambda *args, **kw: loads.append(args) or original(*args, **kw))
    result = train(tiny_sd, subject_dir, tmp_path / "run", "--no-prior", "--steps", "1")
    assert result.exit_code == 0, result.output
    assert len(loads) == 1
