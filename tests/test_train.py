"""End-to-end DreamBooth on the tiny cascade: train, resume, LoRA, generate, and every bad input of issue 3."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from runs import FAST, assert_refused, dbfast, train, unet_weights

from dreambooth_fast.images import make_grid
from dreambooth_fast.lora import LORA_WEIGHTS, TARGET_MODULES
from dreambooth_fast.train import lr_factor


def test_train_with_prior_writes_a_cascade_diffusers_loads(tiny_cascade, subject_dir, tmp_path):
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    out = tmp_path / "run"
    result = train(tiny_cascade, subject_dir, out)
    assert result.exit_code == 0, result.output
    run = json.loads((out / "dreambooth.json").read_text())
    assert run["class_noun"] == "dog"
    assert run["instance_prompts"] == [f"a {run['identifier']} dog"] and run["class_prompt"] == "a dog"
    assert run["stages"] == ["base", "sr"] and set(run["final_loss"]) == {"base", "sr"}
    assert run["config"]["prior_preservation"] and Path(run["class_images"], "base", "0001.png").is_file()
    assert Path(run["class_images"], "sr", "0001.png").is_file()
    assert {"torch", "diffusers", "transformers", "dreambooth_fast"} <= set(run["versions"])
    # Seconds per phase of the run, also summed up in one line at the end.
    assert set(run["timings"]) == {"load", "class_images", "train_base", "train_sr", "write", "pictures"}
    assert all(seconds > 0 for seconds in run["timings"].values()) and "time: load " in result.output
    # Both UNets changed; everything else is the input model's.
    for stage_out, stage_in in [(out, tiny_cascade), (out / "stage_2", tiny_cascade / "stage_2")]:
        tuned, original = unet_weights(stage_out), unet_weights(stage_in)
        assert any(not torch.equal(tuned[k], original[k]) for k in original)
    assert not (out / "checkpoints" / "base-000002").exists()
    IFPipeline.from_pretrained(out)
    IFSuperResolutionPipeline.from_pretrained(out / "stage_2", text_encoder=None)


def test_train_without_prior_and_base_stage_only(tiny_cascade, subject_dir, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_cascade, subject_dir, out, "--no-prior", "--stages", "base", "--min-snr-gamma", "5")
    assert result.exit_code == 0, result.output
    run = json.loads((out / "dreambooth.json").read_text())
    assert run["class_images"] is None and run["stages"] == ["base"]
    assert 'dbfast generate "a [V] dog on the beach"' in result.output  # a real cascade can draw a beach
    assert all(
        torch.equal(v, unet_weights(tiny_cascade / "stage_2")[k]) for k, v in unet_weights(out / "stage_2").items()
    )


@pytest.mark.parametrize(
    ("adam", "options"),
    [({"fused": True}, []), ({"foreach": True}, []), ({"fused": True}, ["--fused-norm"])],
    ids=["fused-adam", "foreach-adam", "fused-norm"],
)
def test_ctrl_c_then_resume_is_bitwise_identical_to_an_uninterrupted_run(
    tiny_cascade, subject_dir, tmp_path, monkeypatch, adam, options
):
    """6 steps straight and 3 steps + Ctrl-C + resume give the same weights, bit for bit (CPU, fp32), with each
    Adam implementation the trainer may choose, and with the fused norm op (--fused-norm)."""
    from dreambooth_fast import train as training
    from dreambooth_fast.train import StageTrainer

    monkeypatch.setattr(training, "adam_options", lambda params: adam)
    fused_blocks = []
    fuse = training.fuse_resnet_norms
    monkeypatch.setattr(training, "fuse_resnet_norms", lambda unet: fused_blocks.append(fuse(unet)))

    common = ["--stages", "base", "--no-prior", "--steps", "6", "--checkpoint-every", "100", "--batch-size", "2",
              *options]
    straight = tmp_path / "straight"
    assert train(tiny_cascade, subject_dir, straight, *common).exit_code == 0
    step = StageTrainer.optimizer_step

    def interrupted_at_step_4(self):
        if self.step == 3:
            raise KeyboardInterrupt  # what Ctrl-C raises in the training loop
        return step(self)

    out = tmp_path / "run"
    monkeypatch.setattr(StageTrainer, "optimizer_step", interrupted_at_step_4)
    assert_refused(train(tiny_cascade, subject_dir, out, *common), "interrupted at base step 3", "--resume")
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 3
    monkeypatch.setattr(StageTrainer, "optimizer_step", step)
    result = train(tiny_cascade, subject_dir, out, *common, "--resume")
    assert result.exit_code == 0, result.output
    tuned, reference = unet_weights(out), unet_weights(straight)
    assert any(not torch.equal(v, unet_weights(tiny_cascade)[k]) for k, v in tuned.items())
    assert all(torch.equal(v, reference[k]) for k, v in tuned.items())
    # A finished run is not silently trained again.
    assert_refused(train(tiny_cascade, subject_dir, out, *common), "--resume", "--overwrite")
    # --fused-norm fused every ResNet block of each of the three runs' UNets; the others none.
    assert fused_blocks == ([fused_blocks[0]] * 3 if options else []) and (not options or fused_blocks[0] > 0)


def test_lora_writes_an_adapter_that_diffusers_and_generate_load(tiny_cascade, subject_dir, tmp_path):
    from diffusers import IFPipeline

    out = tmp_path / "lora"
    result = train(tiny_cascade, subject_dir, out, "--lora-rank", "4", "--no-prior", "--stages", "base")
    assert result.exit_code == 0, result.output
    assert (out / LORA_WEIGHTS).is_file()
    assert all(torch.equal(v, unet_weights(tiny_cascade)[k]) for k, v in unet_weights(out).items())
    pipe = IFPipeline.from_pretrained(out)
    pipe.load_lora_weights(out, weight_name=LORA_WEIGHTS)
    samples = tmp_path / "samples"
    result = dbfast(
        "generate",
        "a [V] dog",
        "--model",
        out,
        "-n",
        "2",
        "--steps",
        "2",
        "--stages",
        "base",
        "--device",
        "cpu",
        "--out",
        samples,
    )
    assert result.exit_code == 0, result.output
    assert Image.open(samples / "image-0001.png").size == (32, 32)


def test_lora_merge_writes_plain_weights(tiny_cascade, subject_dir, tmp_path):
    out = tmp_path / "merged"
    result = train(tiny_cascade, subject_dir, out, "--lora-rank", "4", "--merge", "--no-prior", "--stages", "base")
    assert result.exit_code == 0, result.output
    assert not (out / LORA_WEIGHTS).exists()
    tuned, original = unet_weights(out), unet_weights(tiny_cascade)
    assert set(tuned) == set(original)
    changed = [k for k, v in tuned.items() if not torch.equal(v, original[k])]
    # The adapter wraps the attention projections: merging changes those weights, nothing else.
    assert changed and all(any(f".{m}." in k for m in TARGET_MODULES) for k in changed), changed


def test_generate_runs_the_cascade_and_replaces_the_identifier(tiny_cascade, subject_dir, tmp_path):
    out = tmp_path / "run"
    assert train(tiny_cascade, subject_dir, out, "--no-prior").exit_code == 0
    samples = tmp_path / "samples"
    result = dbfast(
        "generate",
        "a [V] dog on the beach",
        "--model",
        out,
        "-n",
        "3",
        "--steps",
        "2",
        "--sr-steps",
        "2",
        "--device",
        "cpu",
        "--out",
        samples,
    )
    assert result.exit_code == 0, result.output
    assert [Image.open(samples / f"image-{i:04d}.png").size for i in range(3)] == [(64, 64)] * 3
    # The grid is a preview: three 64 px images enlarged 3x (nearest) to be seen without zooming.
    grid = Image.open(samples / "grid.png").convert("RGB")
    assert grid.size == (576, 192)
    exact = make_grid([Image.open(samples / f"image-{i:04d}.png").convert("RGB") for i in range(3)], cols=3)
    assert grid.resize(exact.size, Image.Resampling.NEAREST).tobytes() == exact.tobytes()


def test_training_options_load_from_toml(tiny_cascade, subject_dir, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        f'images = "{subject_dir}"\nclass = "dog"\nstages = "base"\nprior-preservation = false\n'
        f"steps = 1\nlearning-rate = 2e-5\n"
    )
    out = tmp_path / "run"
    result = dbfast("train", "--config", config, "--model", tiny_cascade, "--output", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "dreambooth.json").read_text())["config"]
    assert saved["learning_rate"] == 2e-5 and saved["steps"] == 1 and saved["stages"] == ["base"]


def test_lr_schedules_warm_up_then_hold_or_decay_to_zero_at_the_last_step():
    factors = {s: [lr_factor(step, 10, 2, s) for step in range(10)] for s in ("constant", "linear", "cosine")}
    for schedule, f in factors.items():
        assert f[:3] == [0.5, 1.0, 1.0], schedule  # warm-up over 2 updates, then the full rate
    assert factors["constant"][3:] == [1.0] * 7
    assert factors["linear"][3:] == pytest.approx([0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
    assert factors["cosine"][6] == pytest.approx(0.5)  # half way through the decay
    assert all(a > b for a, b in zip(factors["cosine"][2:], factors["cosine"][3:], strict=False))
    assert 0 < factors["cosine"][-1] < 0.05


def test_an_unknown_lr_schedule_in_a_config_file_is_refused(tiny_cascade, subject_dir, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('lr-schedule = "step"\n')
    result = train(tiny_cascade, subject_dir, tmp_path / "run", "--config", config)
    assert_refused(result, "--lr-schedule", "cosine", out=tmp_path / "run")


def test_captions_give_each_photo_its_own_prompt(tiny_cascade, subject_dir, tmp_path):
    backgrounds = ["white", "blue", "green", "gray"]  # what subject_dir's photos show
    for i, background in enumerate(backgrounds):
        (subject_dir / f"{i}.txt").write_text(f"a [V]  dog on a\n{background} background\n")
    out = tmp_path / "run"
    result = train(tiny_cascade, subject_dir, out, "--captions", "--stages", "base")
    assert result.exit_code == 0, result.output
    run = json.loads((out / "dreambooth.json").read_text())
    assert run["instance_prompts"] == [f"a {run['identifier']} dog on a {b} background" for b in backgrounds]
    assert run["class_prompt"] == "a dog" and run["config"]["captions"]


def test_subject_rows_are_paired_with_their_own_caption(tiny_cascade, tmp_path):
    from dreambooth_fast.config import TrainConfig
    from dreambooth_fast.models import load_cascade
    from dreambooth_fast.train import StageData, StageTrainer, make_prompts

    cascade = load_cascade(tiny_cascade, stages=("base",))
    cfg = TrainConfig(images="-", class_noun="dog", batch_size=8, identifier="xy")
    captions = [f"a [V] dog on a {c} background" for c in ("red", "blue", "green")]
    prompts = make_prompts(cascade, cfg, captions)
    assert prompts.instance == [c.replace("[V]", "xy") for c in captions] and prompts.instance_embeds.shape[0] == 3
    # Three photos, each with --flip's mirror: row i and row i + 3 carry photo i's caption.
    subject = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 3, 8, 8)
    rows = StageData(subject, None, torch.zeros(2, 3, 8, 8), None)
    trainer = StageTrainer("base", cascade.base_unet, cascade.base_scheduler, None, rows, prompts, cfg,
                           torch.device("cpu"), tmp_path, [], None)
    x0, _, embeds, n = trainer._batch()
    photo = x0[:n, 0, 0, 0].long() % 3
    assert torch.equal(embeds[:n], prompts.instance_embeds[photo])
    assert torch.equal(embeds[n:], prompts.class_embeds.expand(n, -1, -1))


def test_caption_files_are_read_only_with_captions(tiny_cascade, subject_dir, tmp_path):
    (subject_dir / "0.txt").write_text("a [V] dog on a white background")
    result = train(tiny_cascade, subject_dir, tmp_path / "run", "--no-prior", "--stages", "base")
    assert result.exit_code == 0, result.output
    assert "0.txt) are not read" in result.output and "--captions" in result.output
    run = json.loads((tmp_path / "run" / "dreambooth.json").read_text())
    assert run["instance_prompts"] == [f"a {run['identifier']} dog"]


# -- bad input: one clear line, exit code 2, nothing written ------------------------------------------------


def test_missing_images_dir(tiny_cascade, tmp_path):
    assert_refused(train(tiny_cascade, tmp_path / "nope", tmp_path / "out"), "nope", out=tmp_path / "out")


def test_empty_images_dir(tiny_cascade, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_refused(train(tiny_cascade, tmp_path / "empty", tmp_path / "out"), "empty", out=tmp_path / "out")


def test_corrupt_image_is_named(tiny_cascade, subject_dir, tmp_path):
    (subject_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    assert_refused(
        train(tiny_cascade, subject_dir, tmp_path / "out"), "broken.jpg", "--skip-bad-images", out=tmp_path / "out"
    )


def test_image_below_half_the_resolution_is_refused(tiny_cascade, tmp_path):
    folder = tmp_path / "tiny-photos"
    folder.mkdir()
    Image.new("RGB", (12, 12), "red").save(folder / "small.png")
    assert_refused(train(tiny_cascade, folder, tmp_path / "out"), "small.png", out=tmp_path / "out")


def test_model_dir_not_in_if_layout(subject_dir, tmp_path):
    (tmp_path / "not-a-model").mkdir()
    assert_refused(
        train(tmp_path / "not-a-model", subject_dir, tmp_path / "out"), "model_index.json", out=tmp_path / "out"
    )


def test_missing_weights(tiny_cascade, subject_dir, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_cascade, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert_refused(train(broken, subject_dir, tmp_path / "out"), "unet", out=tmp_path / "out")


def test_output_dir_with_other_content_is_never_touched(tiny_cascade, subject_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert_refused(train(tiny_cascade, subject_dir, out, "--overwrite"), str(out))
    assert (out / "thesis.tex").read_text() == "precious" and len(list(out.iterdir())) == 1


def test_output_dir_with_a_previous_run_needs_resume_or_overwrite(tiny_cascade, subject_dir, tmp_path):
    out = tmp_path / "run"
    assert train(tiny_cascade, subject_dir, out, "--no-prior", "--stages", "base", "--steps", "1").exit_code == 0
    before = (out / "dreambooth.json").read_text()
    assert_refused(train(tiny_cascade, subject_dir, out, "--no-prior"), "--resume", "--overwrite")
    assert (out / "dreambooth.json").read_text() == before
    assert train(tiny_cascade, subject_dir, out, "--no-prior", "--stages", "base", "--overwrite").exit_code == 0


def test_class_noun_the_tokenizer_cannot_encode(tiny_cascade, subject_dir, tmp_path):
    assert_refused(train(tiny_cascade, subject_dir, tmp_path / "out", "--class", "狗"), "狗", out=tmp_path / "out")


def test_identifier_the_tokenizer_cannot_encode(tiny_cascade, subject_dir, tmp_path):
    assert_refused(train(tiny_cascade, subject_dir, tmp_path / "out", "--identifier", "ж"), "ж", out=tmp_path / "out")


def test_resume_with_changed_options_is_refused(tiny_cascade, subject_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--stages", "base", "--checkpoint-every", "1", "--no-prior", "--steps", "2"]
    assert train(tiny_cascade, subject_dir, out, *common).exit_code == 0
    assert_refused(train(tiny_cascade, subject_dir, out, *common, "--lr", "1e-3", "--resume"), "learning_rate")


def test_a_run_saved_before_an_option_existed_counts_it_at_its_default_on_resume(tiny_cascade, subject_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--stages", "base", "--no-prior", "--steps", "1"]
    assert train(tiny_cascade, subject_dir, out, *common).exit_code == 0
    run = json.loads((out / "dreambooth.json").read_text())
    del run["config"]["lr_schedule"]  # as a dbfast without --lr-schedule wrote it
    (out / "dreambooth.json").write_text(json.dumps(run))
    # Same options: past the options check, to the next one (this run is finished).
    assert_refused(train(tiny_cascade, subject_dir, out, *common, "--resume"), "finished")
    assert_refused(train(tiny_cascade, subject_dir, out, *common, "--lr-schedule", "cosine", "--resume"), "lr_schedule")


def test_resume_of_a_finished_run_says_how_to_train_further(tiny_cascade, subject_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--stages", "base", "--no-prior", "--steps", "1"]
    assert train(tiny_cascade, subject_dir, out, *common).exit_code == 0
    before = unet_weights(out)
    assert_refused(train(tiny_cascade, subject_dir, out, *common[:-1], "2", "--resume"), "finished", f"--model {out}")
    assert all(torch.equal(before[k], v) for k, v in unet_weights(out).items())


def test_8bit_adam_without_bitsandbytes_says_how_to_install_it(tiny_cascade, subject_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    assert_refused(
        train(tiny_cascade, subject_dir, tmp_path / "out", "--use-8bit-adam"),
        "pip install 'dreambooth-fast[bnb]'",
        out=tmp_path / "out",
    )


def test_a_diverging_run_stops_with_the_step_and_what_to_try(tiny_cascade, subject_dir, tmp_path):
    result = train(
        tiny_cascade,
        subject_dir,
        tmp_path / "out",
        "--no-prior",
        "--stages",
        "base",
        "--steps",
        "30",
        "--lr",
        "1e30",
        "--max-grad-norm",
        "1e30",
    )
    assert_refused(result, "the loss is", "--learning-rate")


def test_fp16_training_with_loss_scaling_runs(tiny_cascade, subject_dir, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_cascade, subject_dir, out, "--precision", "fp16", "--no-prior", "--stages", "base",
                   "--steps", "6")
    assert result.exit_code == 0, result.output
    tuned, original = unet_weights(out), unet_weights(tiny_cascade)
    assert all(torch.isfinite(v).all() for v in tuned.values())
    assert any(not torch.equal(v, original[k]) for k, v in tuned.items())
    skipped = json.loads((out / "dreambooth.json").read_text())["skipped_steps"]["base"]
    assert skipped < 6  # the loss scaler found a scale that trains, not one that skips every update


def test_ctrl_c_while_making_class_images_keeps_them_and_resume_continues(
    tiny_cascade, subject_dir, tmp_path, monkeypatch
):
    from dreambooth_fast import prior

    save = prior.save_png

    def interrupted_after_the_first_batch(image, path):
        if int(path.stem) >= 2:  # the second batch of 2
            raise KeyboardInterrupt
        return save(image, path)

    out = tmp_path / "run"
    options = ["--num-class-images", "6", "--class-batch-size", "2", "--stages", "base", "--steps", "1"]
    monkeypatch.setattr(prior, "save_png", interrupted_after_the_first_batch)
    assert_refused(train(tiny_cascade, subject_dir, out, *options), "class images", "--resume")
    monkeypatch.setattr(prior, "save_png", save)
    result = train(tiny_cascade, subject_dir, out, *options, "--resume")
    assert result.exit_code == 0, result.output
    class_dir = Path(json.loads((out / "dreambooth.json").read_text())["class_images"])
    assert sorted(p.name for p in (class_dir / "base").glob("*.png")) == [f"{i:04d}.png" for i in range(6)]


def test_captions_without_a_caption_file_name_it(tiny_cascade, subject_dir, tmp_path):
    for i in range(3):
        (subject_dir / f"{i}.txt").write_text("a [V] dog")
    out = tmp_path / "run"
    assert_refused(train(tiny_cascade, subject_dir, out, "--captions"), "--captions", "3.txt", out=out)


def test_a_caption_without_the_identifier_mark_is_refused(tiny_cascade, subject_dir, tmp_path):
    for i in range(4):
        (subject_dir / f"{i}.txt").write_text("a [V] dog" if i else "a dog on a sofa")
    out = tmp_path / "run"
    assert_refused(train(tiny_cascade, subject_dir, out, "--captions"), "0.txt", "[V] once", out=out)


@pytest.mark.parametrize("noun", ["dog", "heart"])
def test_the_embedded_model_says_what_it_can_draw_and_the_hint_promises_no_more(subject_dir, tmp_path, noun):
    from dreambooth_fast.toy.default_model import DEFAULT_MODEL

    if not (DEFAULT_MODEL / "model_index.json").is_file():
        pytest.skip("no embedded default model in this checkout")
    result = dbfast("train", "--images", subject_dir, "--class", noun, "--output", tmp_path / "run", *FAST,
                    "--no-prior", "--stages", "base")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    done = result.output.rsplit("done: ", 1)[1]  # the closing line (after the progress bar's last redraw)
    assert sum("note: training the embedded toy model" in line for line in lines) == 1
    assert any("pass --model with a DeepFloyd IF cascade" in line for line in lines)
    if noun == "dog":
        assert any("warning: the toy model has never drawn a 'dog'" in line for line in lines)
        assert "draws coloured shapes, not a dog" in done and "dbfast generate" not in done
    else:
        assert not any("never drawn" in line for line in lines)
        assert 'dbfast generate "a [V] heart on a red background"' in done


def test_resume_with_changed_captions_is_refused(tiny_cascade, subject_dir, tmp_path, monkeypatch):
    from dreambooth_fast.train import StageTrainer

    for i in range(4):
        (subject_dir / f"{i}.txt").write_text("a [V] dog on a lawn")
    options = ["--captions", "--stages", "base", "--no-prior", "--steps", "4"]

    def interrupted(self):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    monkeypatch.setattr(StageTrainer, "optimizer_step", interrupted)
    assert_refused(train(tiny_cascade, subject_dir, out, *options), "interrupted", "--resume")
    monkeypatch.undo()
    (subject_dir / "2.txt").write_text("a [V] dog on a sofa")
    assert_refused(train(tiny_cascade, subject_dir, out, *options, "--resume"), "captions changed")
