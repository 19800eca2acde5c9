"""The judge reads shape, colours, background and the subject exactly from generator pixels."""

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from dreambooth_fast.toy import world
from dreambooth_fast.toy.evaluation import diversity
from dreambooth_fast.toy.judge import accuracy, judge

SUBJECT_PNGS = sorted((Path(__file__).resolve().parents[1] / "examples" / "subject").glob("*.png"))


@pytest.mark.parametrize("size", [64, 32])
def test_judge_is_right_on_fresh_generator_samples(size):
    # 32 px is the base stage's resolution, where the pretrained model's samples are judged.
    scores = accuracy(seed=1234 + size, n=150, size=size)
    assert min(scores.values()) >= 0.95, scores


def test_judge_reads_a_known_scene():
    v = judge(world.render(world.Scene("star", "red", "blue", "striped", 0.3, 0.45, 0.55)))
    assert (v.shape, v.colour, v.colours, v.background, v.pattern, v.subject) == (
        "star", "red", ("red",), "blue", "striped", False)


def test_the_example_subject_is_recognised():
    assert len(SUBJECT_PNGS) == 4
    for path in SUBJECT_PNGS:
        v = judge(Image.open(path))
        assert v.subject and v.shape == "heart" and set(v.colours) == set(world.SUBJECT_COLOURS), (path, v)


def test_a_pattern_sampled_in_an_off_palette_colour_stays_background():
    # Model samples draw stripes in colours off the palette (a grey-green for green, nearer to black's shade than
    # to green): they are on the border as much as the shade, so they are background, not object.
    scene = world.subject_scene(random.Random(3), "green", "striped")
    pixels = np.asarray(world.render(scene, 32)).copy()
    stripes = np.all(pixels == world.PALETTE["green"], axis=-1)
    assert stripes.mean() > 0.2
    pixels[stripes] = (78, 112, 85)  # read off a DreamBooth sample whose judged shape was "square"
    v = judge(pixels)
    assert (v.shape, v.background, v.pattern, v.subject) == ("heart", "green", "striped", True)


def test_hearts_without_the_pattern_are_not_the_subject():
    plain = world.Scene("heart", "yellow", "blue", "plain", 0.3, 0.5, 0.5)
    assert not judge(world.render(plain)).subject
    subject = world.Scene("heart", "yellow", "green", "plain", 0.3, 0.5, 0.5, subject=True)
    assert judge(world.render(subject)).subject
    assert not judge(ImageOps.mirror(world.render(subject))).subject  # purple left, yellow right
    assert not judge(world.render(world.Scene("square", "yellow", "blue", "plain", 0.3, 0.5, 0.5))).subject


def test_an_empty_background_has_no_object():
    v = judge(Image.new("RGB", (32, 32), world.PALETTE["green"]))
    assert v.shape is None and v.background == "green" and v.pattern == "plain" and not v.subject


def test_diversity_counts_differing_pairs():
    a = judge(world.render(world.Scene("heart", "red", "blue", "plain", 0.3, 0.5, 0.5)))
    b = judge(world.render(world.Scene("heart", "green", "blue", "plain", 0.3, 0.5, 0.5)))
    assert diversity([a, a, a]) == 0.0
    assert diversity([a, b]) == 1.0


def test_toy_eval_reports_prompt_fidelity_pres_and_div(tiny_cascade, tmp_path):
    import json
    import shutil

    from dreambooth_fast.toy.evaluation import evaluate, format_results

    run = tmp_path / "run"
    shutil.copytree(tiny_cascade, run)
    (run / "dreambooth.json").write_text(json.dumps(
        {"identifier": "sks", "class_noun": "heart", "config": {"prior_preservation": True}}))
    results, path = evaluate(run, n=1, steps=2)
    assert path == run / "toy_eval.json" and json.loads(path.read_text()) == results
    figures = {**results["prompt_fidelity"], **results["named_fidelity"], **results["dreambooth"]}
    assert {"shape", "colour", "shape_and_colour", "colours", "shape_and_colours", "subject", "background", "pres",
            "pres_in_context", "div"} <= set(figures)
    assert all(0 <= v <= 1 for k, v in figures.items() if not k.startswith("n"))
    assert set(results["stage2_fidelity"]) == {"n", "shape", "colours", "background", "all"}
    text = format_results(results)
    assert "PRES" in text and "named-thing fidelity" in text and "stage II fidelity" in text


def test_dbfast_eval_toy_is_the_command_line_of_the_toy_evaluation(tiny_cascade, tmp_path):
    import json

    from click.testing import CliRunner

    from dreambooth_fast.cli import main

    out = tmp_path / "toy.json"
    args = ["eval", "--toy", "--model", tiny_cascade, "--n", "1", "--steps", "2", "--seed", "3", "--out", out]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    assert (results["steps"], results["seed"], results["prompt_fidelity"]["n"]) == (2, 3, 8)
    assert "held-out prompt fidelity" in result.output and f"results: {out}" in result.output


def test_stage2_fidelity_compares_stage_two_with_the_image_it_upscales():
    from dreambooth_fast.toy.evaluation import stage2_fidelity

    scenes = [world.random_scene(random.Random(k)) for k in range(6)]
    base = [np.asarray(world.render(s, 32)) for s in scenes]
    faithful = [np.asarray(world.render(s, 64)) for s in scenes]
    assert stage2_fidelity(base, faithful) == {"n": 6, "shape": 1.0, "colours": 1.0, "background": 1.0, "all": 1.0}
    # Stage II drawing another shape for half of them: those are not kept.
    others = [world.random_scene(random.Random(k), shape="circle" if s.shape == "star" else "star")
              for k, s in enumerate(scenes[:3])]
    swapped = [np.asarray(world.render(s, 64)) for s in others] + faithful[3:]
    kept = stage2_fidelity(base, swapped)
    assert (kept["shape"], kept["all"]) == (0.5, 0.5)
