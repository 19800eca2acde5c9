"""The toy world: seeded generator, held-out combinations, the example subject, and the shipped default model."""

import copy
import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_fast.models import STAGE_2_DIR, load_cascade
from dreambooth_fast.toy import world
from dreambooth_fast.toy.judge import judge

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "dreambooth_fast" / "default_model"


def test_same_seed_same_images_and_captions():
    a, b, c = world.sample(3, 6), world.sample(3, 6), world.sample(4, 6)
    assert [cap for _, cap, _ in a] == [cap for _, cap, _ in b]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (x, _, _), (y, _, _) in zip(a, b))
    assert [s for _, _, s in a] != [s for _, _, s in c]


def test_images_are_64px_rgb_and_anti_aliased():
    image, _, scene = world.sample(0, 1)[0]
    assert image.size == (64, 64) and image.mode == "RGB"
    colours = {tuple(p) for p in np.asarray(image).reshape(-1, 3)}
    assert len(colours) > 3  # edge pixels blend object and background


def test_captions_name_shape_colour_and_background():
    scene = world.Scene("star", "red", "blue", "plain", 0.3, 0.5, 0.5)
    assert world.caption(scene) == "a red star on a blue background"
    scene = world.Scene("ring", "orange", "green", "striped", 0.3, 0.5, 0.5)
    assert world.caption(scene) == "an orange ring on a green striped background"
    rng = random.Random(0)
    phrasings = {world.caption(scene, rng) for _ in range(200)}
    assert len(phrasings) >= 5 and all("ring" in p for p in phrasings)


def test_the_world_has_enough_shapes_colours_and_backgrounds():
    assert len(world.SHAPES) >= 8 and len(world.COLOURS) >= 8
    assert set(world.PATTERNS) == {"plain", "striped", "checked", "dotted"}


def test_held_out_pairs_are_never_drawn_in_training():
    rng = random.Random(0)
    scenes = [world.random_scene(rng) for _ in range(5000)]
    pairs = {(s.shape, s.colour) for s in scenes}
    assert not pairs & world.HELD_OUT
    # Every shape and every colour is still seen, only the pairs are new.
    assert {s for s, _ in pairs} == set(world.SHAPES) and {c for _, c in pairs} == set(world.COLOURS)
    assert all(s.background != s.colour and not s.subject for s in scenes)
    with pytest.raises(ValueError):
        world.random_scene(rng, shape="star", colour=dict(world.HELD_OUT)["star"])


def test_held_out_prompts_ask_for_held_out_pairs_only():
    cases = world.held_out_prompts(0, per_pair=2)
    assert len(cases) == 2 * len(world.HELD_OUT)
    assert {(s.shape, s.colour) for _, s in cases} == set(world.HELD_OUT)
    assert all(p == world.caption(s) for p, s in cases)


def _load_script():
    spec = importlib.util.spec_from_file_location("make_example_subject", ROOT / "examples" / "make_example_subject.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_subject_script_reproduces_the_committed_images_and_captions(tmp_path):
    made = _load_script().make(tmp_path)
    committed = sorted((ROOT / "examples" / "subject").iterdir())
    assert [p.name for p in made] == [p.name for p in committed] == [
        f"heart_{i}.{ext}" for i in range(4) for ext in ("png", "txt")]
    for new, old in zip(made, committed):
        if new.suffix == ".png":
            assert np.array_equal(np.asarray(Image.open(new)), np.asarray(Image.open(old)))
        else:
            assert new.read_text() == old.read_text()


def test_each_example_caption_names_its_photos_background():
    for i, (colour, pattern) in enumerate(world.SUBJECT_BACKGROUNDS):
        caption = (ROOT / "examples" / "subject" / f"heart_{i}.txt").read_text()
        verdict = judge(Image.open(ROOT / "examples" / "subject" / f"heart_{i}.png"))
        assert caption == f"a [V] heart on {world.with_article(world.background_phrase(colour, pattern))}\n"
        assert (verdict.background, verdict.pattern, verdict.subject) == (colour, pattern, True)


def test_the_subject_is_a_pattern_the_world_never_draws():
    subject = np.asarray(world.draw_subject(7)[0])
    plain = world.Scene(world.SUBJECT_SHAPE, world.SUBJECT_COLOURS[0], "blue", "plain", 0.3, 0.5, 0.5)
    assert not np.array_equal(subject, np.asarray(world.render(plain)))
    assert {tuple(c) for c in (world.PALETTE[k] for k in world.SUBJECT_COLOURS)} <= {
        tuple(p) for p in subject.reshape(-1, 3)}


def test_named_things_are_two_coloured_things_called_by_name_and_never_hearts():
    assert len(set(world.NAMED_THINGS.values())) == len(world.NAMES)  # no two look alike
    rng = random.Random(0)
    for name in world.NAMES:
        thing, scene = world.NAMED_THINGS[name], world.named_scene(rng, name)
        assert thing.shape != world.SUBJECT_SHAPE and scene.background not in thing.colours
        assert world.caption(scene).startswith(f"a {name} {thing.shape} on ")  # the name stands for the colours
        image = world.render(scene)
        assert {world.PALETTE[c] for c in thing.colours} <= {tuple(p) for p in np.asarray(image).reshape(-1, 3)}
        verdict = judge(image)
        assert verdict.shape == thing.shape and thing.colours[0] in verdict.colours and not verdict.subject


def test_named_things_join_pretraining_batches_only_when_asked():
    from dreambooth_fast.toy.pretrain import toy_batch

    def named_captions(captions):
        return sum(any(name in c.split() for name in world.NAMES) for c in captions)

    plain, captions = toy_batch(0, 5, 16)
    assert named_captions(captions) == 0
    assert torch.equal(plain, toy_batch(0, 5, 16, named=0.0)[0])  # batches before named things: as they were
    _, captions = toy_batch(0, 5, 64, drop=0.0, named=0.25)
    assert 6 <= named_captions(captions) <= 28


@pytest.mark.skipif(not (DEFAULT_MODEL / "model_index.json").is_file(), reason="default model weights not built")
def test_default_model_loads_as_an_if_cascade():
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    cascade = load_cascade(DEFAULT_MODEL)
    assert (cascade.base_size, cascade.sr_size) == (32, 64)
    assert cascade.sr_unet.config.in_channels == 6 and cascade.base_unet.config.out_channels == 6
    pipe = IFPipeline.from_pretrained(DEFAULT_MODEL, safety_checker=None, watermarker=None, feature_extractor=None)
    sr = IFSuperResolutionPipeline.from_pretrained(DEFAULT_MODEL / STAGE_2_DIR, text_encoder=None, safety_checker=None,
                                                   watermarker=None, feature_extractor=None)
    embeds, negative = pipe.encode_prompt("a red star on a blue background")
    low = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    high = sr(image=low, prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2,
              output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert low.shape == (1, 3, 32, 32) and high.shape == (1, 3, 64, 64)


def test_pretrain_writes_a_loadable_cascade_and_its_cost(tmp_path):
    from dreambooth_fast.toy.pretrain import COST_FILE, pretrain

    out = pretrain(tmp_path / "toy", steps=1, base_batch=2, sr_batch=1, text_steps=2)
    cascade = load_cascade(out)
    assert (cascade.base_size, cascade.sr_size) == (32, 64)
    cost = json.loads((out / COST_FILE).read_text())
    assert cost["steps"] == 1 and cost["threads"] == 1
    assert cost["text_encoder"]["steps"] == 2 and 0 <= cost["text_encoder"]["probe_accuracy"] <= 1


def test_from_sr_v_from_only_stage_two_trains_and_it_predicts_v(tmp_path, monkeypatch):
    from dreambooth_fast.toy import pretrain as pretraining

    monkeypatch.setattr(pretraining, "SR_V_FROM", 1)
    options = dict(base_batch=2, sr_batch=1, checkpoint_every=1, text_steps=2)
    pretraining.pretrain(tmp_path / "toy", steps=1, **options)
    before = torch.load(tmp_path / "toy" / pretraining.CHECKPOINT, weights_only=True)
    out = pretraining.pretrain(tmp_path / "toy", steps=2, resume=True, **options)
    after = torch.load(out / pretraining.CHECKPOINT, weights_only=True)
    for key in before["ema"]:
        if not key.startswith("sr_unet."):
            assert torch.equal(before["ema"][key], after["ema"][key]), key
            assert torch.equal(before["model"][key], after["model"][key]), key
    assert any(not torch.equal(before["ema"][k], after["ema"][k]) for k in before["ema"] if k.startswith("sr_unet."))
    assert len(after["losses"]["base"]) == 1 and len(after["losses"]["sr"]) == 2
    cascade = load_cascade(out)
    assert cascade.base_scheduler.config.prediction_type == "epsilon"
    assert cascade.sr_scheduler.config.prediction_type == "v_prediction"


def test_caption_labels_read_every_phrasing_of_the_world():
    from dreambooth_fast.toy.pretrain import CAPTION_FIELDS, caption_labels

    rng = random.Random(0)
    for _ in range(500):
        scene = world.random_scene(rng, train=False)
        caption = world.caption(scene, rng)
        words = caption.split()
        named = {"shape": True, "colour": scene.colour in words, "background": "background" in words,
                 "pattern": "background" in words}
        for field, index in caption_labels(caption).items():
            if named[field]:
                assert CAPTION_FIELDS[field][index] == getattr(scene, field), (caption, field)
            else:
                assert index == -1, (caption, field)
    assert set(caption_labels("").values()) == {-1}


def test_the_frozen_text_encoder_is_taught_to_read_captions_first(tmp_path):
    from transformers import T5Tokenizer

    from dreambooth_fast.toy.pretrain import Models, pretrain_text_encoder, train_tokenizer

    train_tokenizer(tmp_path, seed=0)
    tokenizer = T5Tokenizer.from_pretrained(tmp_path, extra_ids=0)
    torch.manual_seed(0)
    encoder = Models(len(tokenizer)).text_encoder
    untrained = pretrain_text_encoder(copy.deepcopy(encoder), tokenizer, seed=0, steps=0)
    trained = pretrain_text_encoder(encoder, tokenizer, seed=0, steps=60)
    assert untrained < 0.5 < trained


def test_pretrain_resumes_exactly(tmp_path):
    from dreambooth_fast.toy.pretrain import CHECKPOINT, pretrain

    options = dict(base_batch=2, sr_batch=1, checkpoint_every=1, text_steps=2)
    pretrain(tmp_path / "straight", steps=2, **options)
    pretrain(tmp_path / "stopped", steps=1, **options)
    pretrain(tmp_path / "stopped", steps=2, resume=True, **options)
    a = torch.load(tmp_path / "straight" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "stopped" / CHECKPOINT, weights_only=True)
    assert a["losses"] == b["losses"]
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
