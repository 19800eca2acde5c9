"""--train-text-encoder (issue 19 item 4) on the tiny Stable Diffusion model (toy/tiny_sd.py): the CLIP text
encoder trains with the UNet, full or LoRA, its own learning rate, in the checkpoints (resume bit-exact) and the
output (StableDiffusionPipeline loads it), the frozen encoder behind --prior-mode predictions' targets, and one
line for every combination it refuses."""

import json
import shutil

import pytest
import torch
from runs import assert_refused, dbfast, interrupted_then_resumed, train
from safetensors import safe_open
from safetensors.torch import load_file

from dreambooth_fast.lora import LORA_WEIGHTS
from dreambooth_fast.models import load_cascade
from dreambooth_fast.text import clip_tokens, encode_clip_tokens, encode_prompts
from dreambooth_fast.text_training import TextTraining
from dreambooth_fast.train import StageTrainer

TEXT = ["--train-text-encoder", "--text-encoder-lr", "1e-3"]


def text_weights(model_dir):
    return load_file(model_dir / "text_encoder" / "model.safetensors")


def pipeline_embeds(pipe, prompt="a dog"):
    return pipe.encode_prompt([prompt], "cpu", 1, False)[0]


def _lrs_of_each_step(monkeypatch) -> list:
    """Each step's optimizer parameter groups as (lr, number of parameters, text encoder's?)."""
    seen, step = [], StageTrainer.optimizer_step

    def recording(self):
        text_ids = {id(p) for p in self.text.params} if self.text is not None else set()
        seen.append([(g["lr"], len(g["params"]), all(id(p) in text_ids for p in g["params"]))
                     for g in self.optimizer.param_groups])
        return step(self)

    monkeypatch.setattr(StageTrainer, "optimizer_step", recording)
    return seen


def test_the_tokens_encoded_in_the_step_give_the_pipelines_embeddings(tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    prompts = ["a dt dog", "a dog", ""]
    tokens = clip_tokens(pipe.tokenizer, pipe.text_encoder, prompts)
    assert tokens.shape == (3, 2, 77)
    with torch.no_grad():
        torch.testing.assert_close(encode_clip_tokens(pipe.text_encoder, tokens),
                                   encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts), rtol=0, atol=0)


def test_full_fine_tuning_trains_the_encoder_and_writes_it_where_the_pipeline_loads_it(
        tiny_sd, subject_dir, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    input_weights = text_weights(tiny_sd)
    lrs = _lrs_of_each_step(monkeypatch)
    grids = []
    validation_embeds = TextTraining.validation_embeds
    monkeypatch.setattr(TextTraining, "validation_embeds",
                        lambda self, n: grids.append(n) or validation_embeds(self, n))
    out = tmp_path / "run"
    result = train(tiny_sd, subject_dir, out, *TEXT, "--lr", "1e-4", "--validation-prompt", "a [V] dog",
                   "--validation-every", "2")
    assert result.exit_code == 0, result.output
    # One Adam, two groups: the UNet's at --lr, the whole encoder's at --text-encoder-lr.
    n_text = len(load_cascade(tiny_sd, with_unets=False).text_encoder.state_dict())
    assert lrs[0][0][0] == 1e-4 and not lrs[0][0][2]
    assert lrs[0][1] == (1e-3, n_text, True)
    assert grids == [2]  # the validation grid's prompts went through the encoder being trained
    run = json.loads((out / "dreambooth.json").read_text())
    assert run["text_encoder"] == {"trained": True, "how": "full", "learning_rate": 1e-3}
    assert run["config"]["train_text_encoder"] is True

    tuned = text_weights(out)
    assert tuned.keys() == input_weights.keys()
    assert any(not torch.equal(tuned[k], input_weights[k]) for k in tuned)
    assert all(torch.equal(v, input_weights[k]) for k, v in text_weights(tiny_sd).items())  # the input is untouched
    original = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert not torch.allclose(pipeline_embeds(pipe), pipeline_embeds(original))
    # dbfast generate and eval load the output's encoder: the tuned one.
    ours = load_cascade(out, with_unets=False).text_encoder
    torch.testing.assert_close(encode_prompts(pipe.tokenizer, ours, ["a dog"]), pipeline_embeds(pipe))
    samples = tmp_path / "samples"
    result = dbfast("generate", "a [V] dog", "--model", out, "-n", "1", "--steps", "2", "--device", "cpu",
                    "--out", samples)
    assert result.exit_code == 0, result.output


def test_default_text_encoder_lr_is_the_unets(tiny_sd, subject_dir, tmp_path, monkeypatch):
    lrs = _lrs_of_each_step(monkeypatch)
    result = train(tiny_sd, subject_dir, tmp_path / "run", "--train-text-encoder", "--lr", "3e-5", "--no-prior",
                   "--steps", "1")
    assert result.exit_code == 0, result.output
    assert [lr for lr, _, _ in lrs[0]] == [3e-5, 3e-5]
    run = json.loads((tmp_path / "run" / "dreambooth.json").read_text())
    assert run["text_encoder"]["learning_rate"] == 3e-5


def test_without_the_option_the_encoder_is_frozen_and_not_written(tiny_sd, subject_dir, tmp_path, monkeypatch):
    lrs = _lrs_of_each_step(monkeypatch)
    out = tmp_path / "run"
    assert train(tiny_sd, subject_dir, out, "--no-prior", "--steps", "1").exit_code == 0
    assert len(lrs[0]) == 1
    assert json.loads((out / "dreambooth.json").read_text())["text_encoder"] == {"trained": False}
    name = "text_encoder/model.safetensors"
    assert (out / name).read_bytes() == (tiny_sd / name).read_bytes()


def test_lora_saves_the_encoders_adapter_in_the_same_file_and_load_lora_weights_applies_both(
        tiny_sd, subject_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "lora"
    result = train(tiny_sd, subject_dir, out, "--lora-rank", "4", "--no-prior", "--lr", "1e-2", *TEXT)
    assert result.exit_code == 0, result.output
    with safe_open(str(out / LORA_WEIGHTS), "pt") as f:
        keys = list(f.keys())
    text_keys = [k for k in keys if k.startswith("text_encoder.")]
    assert text_keys and any(k.startswith("unet.") for k in keys)
    assert {k.split(".self_attn.")[1].split(".")[0] for k in text_keys} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert text_weights(out).keys() == text_weights(tiny_sd).keys()  # text_encoder/ is the input's
    assert all(torch.equal(v, text_weights(tiny_sd)[k]) for k, v in text_weights(out).items())
    assert json.loads((out / "dreambooth.json").read_text())["text_encoder"]["how"] == "lora"

    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    before = pipeline_embeds(pipe)
    pipe.load_lora_weights(out, weight_name=LORA_WEIGHTS)
    after = pipeline_embeds(pipe)
    assert not torch.allclose(before, after)  # the encoder's adapter applied
    # What dbfast generate and eval load: the input's encoder with the adapter folded in.
    ours = load_cascade(out, with_unets=False).text_encoder
    torch.testing.assert_close(encode_prompts(pipe.tokenizer, ours, ["a dog"]), after, rtol=1e-5, atol=1e-5)
    # A new run from it would drop the encoder's adapter from its output: refused.
    again = tmp_path / "again"
    assert_refused(train(out, subject_dir, again), "text-encoder LoRA adapter", "--merge", out=again)

    merged = tmp_path / "merged"
    result = train(tiny_sd, subject_dir, merged, "--lora-rank", "4", "--no-prior", "--lr", "1e-2", *TEXT, "--merge")
    assert result.exit_code == 0, result.output
    assert not (merged / LORA_WEIGHTS).exists()
    folded = StableDiffusionPipeline.from_pretrained(merged, local_files_only=True)
    torch.testing.assert_close(pipeline_embeds(folded), after, rtol=1e-5, atol=1e-5)  # the same training, folded


@pytest.mark.parametrize("how", ["full", "lora"])
def test_ctrl_c_then_resume_is_bitwise_identical_with_the_encoder(tiny_sd, subject_dir, tmp_path, monkeypatch, how):
    options = ["--steps", "4", "--checkpoint-every", "100", "--batch-size", "2", *TEXT]
    options += ["--lora-rank", "4", "--no-prior"] if how == "lora" else []
    # A resumed run refuses another --train-text-encoder than it was started with.
    step = StageTrainer.optimizer_step

    def interrupted(self):
        if self.step == 1:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(StageTrainer, "optimizer_step", interrupted)
    half = tmp_path / "half"
    assert_refused(train(tiny_sd, subject_dir, half, *options), "interrupted at base step 1")
    monkeypatch.setattr(StageTrainer, "optimizer_step", step)
    without = [o for o in options if o not in TEXT]
    assert_refused(train(tiny_sd, subject_dir, half, *without, "--resume"), "--resume with different options",
                   "train_text_encoder")

    interrupted_then_resumed(tiny_sd, subject_dir, tmp_path, monkeypatch, options, stop_after=2)
    straight, resumed = tmp_path / "straight", tmp_path / "run"
    if how == "full":
        a, b = text_weights(straight), text_weights(resumed)
        assert any(not torch.equal(v, text_weights(tiny_sd)[k]) for k, v in a.items())
        assert all(torch.equal(v, b[k]) for k, v in a.items())
    else:
        a, b = load_file(straight / LORA_WEIGHTS), load_file(resumed / LORA_WEIGHTS)
        assert a.keys() == b.keys() and any(k.startswith("text_encoder.") for k in a)
        assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_prior_mode_predictions_takes_its_targets_from_the_frozen_encoder(tiny_sd, subject_dir, tmp_path,
                                                                          monkeypatch):
    """The frozen model's target for 'a dog' is computed from the frozen encoder's embeddings at every step, while
    the trained prior rows see 'a dog' through the encoder being trained, which moves away from them."""
    frozen = load_cascade(tiny_sd, with_unets=False)
    frozen_class = encode_prompts(frozen.tokenizer, frozen.text_encoder, ["a dog"])
    seen = []
    prediction = StageTrainer.frozen_prediction

    def recording(self, model_input, timesteps, embeds, class_labels, channels):
        with torch.no_grad():
            trained = self.text.encode(self.text.class_)
        seen.append((embeds.detach().clone(), trained))
        return prediction(self, model_input, timesteps, embeds, class_labels, channels)

    monkeypatch.setattr(StageTrainer, "frozen_prediction", recording)
    out = tmp_path / "run"
    result = train(tiny_sd, subject_dir, out, "--prior-mode", "predictions", *TEXT, "--steps", "3")
    assert result.exit_code == 0, result.output
    assert len(seen) == 3
    for embeds, _ in seen:
        torch.testing.assert_close(embeds, frozen_class.expand(len(embeds), -1, -1), rtol=0, atol=0)
    assert not torch.allclose(seen[-1][1], frozen_class)  # the trained encoder's class embedding has moved


# -- refusals: one line, exit 2, nothing written -------------------------------------------------------------


def test_deepfloyd_if_refuses_it_saying_why(tiny_cascade, subject_dir, tmp_path):
    out = tmp_path / "run"
    assert_refused(train(tiny_cascade, subject_dir, out, "--train-text-encoder"), "--train-text-encoder",
                   "T5-XXL", "4.7B", "only the UNets", out=out)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--text-encoder-lr", "1e-5"], ["--text-encoder-lr", "--train-text-encoder"]),
        (["--train-text-encoder", "--text-encoder-lr", "0"], ["--text-encoder-lr must be a positive number"]),
        (["--train-text-encoder", "--text-encoder-lr", "nan"], ["--text-encoder-lr must be a positive number"]),
        (["--train-text-encoder", "--stages", "sr"], ["--train-text-encoder", "base stage", "--stages"]),
    ],
    ids=["lr-without-option", "lr-zero", "lr-nan", "no-base-stage"],
)
def test_option_mistakes_are_one_line(tiny_sd, subject_dir, tmp_path, options, words):
    out = tmp_path / "run"
    assert_refused(train(tiny_sd, subject_dir, out, *options), *words, out=out)


@pytest.mark.slow
def test_several_processes_are_refused_once_before_anything_is_written(tiny_sd, subject_dir, tmp_path):
    """The encoder is not wrapped in DDP: a run over several processes is refused (rank 0 says it once)."""
    from test_distributed import run_dbfast, train_args

    for nproc, extra in ((2, []), (0, ["--nproc-per-node", "2"])):  # under torchrun, and started by dbfast
        out = tmp_path / f"run-{nproc}"
        result = run_dbfast(nproc, *train_args(tiny_sd, subject_dir, out, "--train-text-encoder", *extra),
                            cache=tmp_path / "cache")
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, result.stderr[-2000:]
        assert "--train-text-encoder runs in one process, this run has 2" in errors[0]
        assert result.returncode == (2 if nproc == 0 else 1) and not out.exists()  # torchrun says 1 for any failure


def test_the_pieces_are_a_copy_of_the_input_not_a_link_into_it(tiny_sd, subject_dir, tmp_path):
    """The output's text_encoder/ starts as hard links to the input's: writing the tuned one must not write
    through them."""
    model = shutil.copytree(tiny_sd, tmp_path / "model")
    before = (model / "text_encoder" / "model.safetensors").read_bytes()
    out = tmp_path / "run"
    assert train(model, subject_dir, out, *TEXT, "--no-prior", "--steps", "1").exit_code == 0
    assert (model / "text_encoder" / "model.safetensors").read_bytes() == before
    assert (out / "text_encoder" / "model.safetensors").read_bytes() != before
