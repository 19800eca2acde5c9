"""`dbfast train --subjects FILE`: many subjects as a queue, in one process and over two torchrun ranks."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from dreambooth_fast.models import load_cascade
from dreambooth_fast.prior import default_cache_root
from dreambooth_fast.subjects import _RankPrefix, read_subjects
from tests.runs import assert_refused, dbfast

ROOT = Path(__file__).resolve().parents[1]
# The tests' FAST options as the subjects file's shared options; base stage only: the queue is under test, not SR.
SHARED = """
steps = 2
num-class-images = 2
class-sample-steps = 2
sr-sample-steps = 2
device = "cpu"
stages = "base"
"""


def photos(folder: Path, colour: tuple[int, int, int], bad: str | None = None) -> Path:
    """Four small photos of a coloured square; `bad`: one more file of that name that is no image."""
    folder.mkdir(parents=True)
    for i, background in enumerate(["white", "blue", "green", "gray"]):
        image = Image.new("RGB", (80, 80), background)
        image.paste(colour, (20 + 4 * i, 20, 60 + 4 * i, 60))
        image.save(folder / f"{i}.png")
    if bad:
        (folder / bad).write_bytes(b"this is not a photo")
    return folder


def subjects_file(folder: Path, model: Path, subjects: list[dict], shared: str = SHARED) -> Path:
    tables = "".join("\n[[subject]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in s.items()) for s in subjects)
    path = folder / "subjects.toml"
    path.write_text(f'model = "{model}"\n{shared}{tables}')
    return path


def three_subjects(tmp_path: Path, model: Path) -> Path:
    """Two good dogs and, between them, one whose photos hold a file that is no image."""
    photos(tmp_path / "rex", (220, 20, 20))
    photos(tmp_path / "broken", (20, 220, 20), bad="4.jpg")
    photos(tmp_path / "fido", (20, 20, 220))
    return subjects_file(tmp_path, model, [
        {"images": "rex", "class": "dog", "output": "runs/rex"},
        {"name": "broken", "images": "broken", "class": "dog", "output": "runs/broken"},
        {"images": "fido", "class": "dog", "output": "runs/fido"},
    ])


def class_pngs() -> int:
    return len(list(default_cache_root().rglob("*.png")))


def summary_of(path: Path) -> dict:
    return json.loads(path.with_name(f"{path.stem}-summary.json").read_text())


# -- the subjects file, checked before anything runs -------------------------------------------------------


REX = '[[subject]]\nimages = "p"\nclass = "dog"\noutput = "a"\n'  # one good subject table


@pytest.mark.parametrize("text, words", [
    ("[[subject]\n", ["not valid TOML"]),
    ("steps = 2\n", ["holds no subjects"]),
    ("subject = 3\n", ["holds no subjects"]),
    ('[[subject]]\nclass = "dog"\noutput = "a"\n', ["subject 1", "has no images"]),
    ('[[subject]]\nimages = "p"\noutput = "a"\n', ["subject 1", "has no class"]),
    ('[[subject]]\nimages = "p"\nclass = "dog"\n', ["subject 1", "has no output"]),
    (REX + 'colour = "red"\n', ["subject 1", "unknown", "colour"]),
    ('colour = "red"\n' + REX, ["unknown", "colour"]),
    ('images = "p"\n[[subject]]\nclass = "dog"\noutput = "a"\n', ["images at the top"]),
    (REX + '[[subject]]\nimages = "q"\nclass = "cat"\noutput = "a"\n', ["subjects 1 and 2", "same output"]),
    (REX + '[[subject]]\nimages = "q"\nclass = "cat"\noutput = "a/b"\n', ["subjects 1 and 2", "same output"]),
    (REX + '[[subject]]\nimages = "a/photos"\nclass = "cat"\noutput = "b"\n',
     ["subject 1's output a overlaps subject 2's --images"]),
    ('[[subject]]\nimages = "p"\nclass = "dog"\noutput = "p/run"\n', ["subject 1's output p/run overlaps its own"]),
    (REX + '[[subject]]\nname = "max"\nimages = "q"\nclass = "cat"\noutput = "b"\nsteps = 0\n',
     ["subject 2 (max)", "--steps must be at least 1"]),
    (REX + "fsdp = true\n", ["subject 1", "--fsdp", "one process"]),
    (REX + 'learning-rate = "fast"\n', ["subject 1", "learning-rate"]),
    ('[[subject]]\nname = 7\nimages = "p"\nclass = "dog"\noutput = "a"\n', ["subject 1", "name must be"]),
])
def test_a_bad_subjects_file_is_one_error_line_and_nothing_runs(tmp_path, text, words):
    path = tmp_path / "subjects.toml"
    path.write_text(text)
    result = dbfast("train", "--subjects", path)
    assert_refused(result, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["subjects.toml"]  # no output, no summary


def test_a_missing_subjects_file_is_named(tmp_path):
    assert_refused(dbfast("train", "--subjects", tmp_path / "nope.toml"), "--subjects", "nope.toml", "does not exist")


@pytest.mark.parametrize("options, words", [
    (["--images", "photos"], ["--images with --subjects"]),
    (["--output", "runs/x"], ["--output with --subjects"]),
    (["--resume", "--overwrite"], ["--resume or --overwrite, not both"]),
])
def test_options_that_belong_to_one_subject_are_refused_beside_subjects(tmp_path, options, words):
    path = tmp_path / "subjects.toml"
    path.write_text(REX)
    assert_refused(dbfast("train", "--subjects", path, *options), *words)
    assert not (tmp_path / "a").exists()


def test_summary_without_subjects_is_refused(tmp_path):
    assert_refused(dbfast("train", "--images", tmp_path, "--class", "dog", "--summary", tmp_path / "s.json"),
                   "--summary", "--subjects")


def test_the_subject_overrides_the_file_which_overrides_the_command_line(tmp_path):
    path = tmp_path / "sub" / "subjects.toml"
    path.parent.mkdir()
    path.write_text('steps = 3\nclass = "dog"\n'
                    '[[subject]]\nimages = "photos/rex"\noutput = "runs/rex"\n'
                    '[[subject]]\nname = "tom"\nimages = "/abs/tom"\nclass = "cat"\noutput = "runs/tom"\nsteps = 7\n')
    subjects = read_subjects(path, {"steps": 5, "learning_rate": 2e-5, "model": "models/if"})
    rex, tom = subjects
    assert (rex.cfg.steps, tom.cfg.steps) == (3, 7)
    assert (rex.cfg.class_noun, tom.cfg.class_noun) == ("dog", "cat")
    assert rex.cfg.learning_rate == tom.cfg.learning_rate == 2e-5  # the command line's, where the file is silent
    # Paths in the file are relative to its folder; the command line's stay as they were given (to the cwd).
    assert rex.cfg.images == str(path.parent.resolve() / "photos/rex") and tom.cfg.images == "/abs/tom"
    assert rex.cfg.model == "models/if"
    assert (rex.name, rex.output, tom.name, tom.output) == ("rex", "runs/rex", "tom", "runs/tom")


def test_rank_prefix_keeps_whole_lines_and_the_last_state_of_a_progress_bar():
    class Sink:
        encoding, errors, text = "utf-8", "strict", ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    sink = Sink()
    stream = _RankPrefix(sink, 1)
    stream.write("train base:   0%\rtrain base:  50%")
    assert sink.text == ""  # no whole line yet
    stream.write("\rtrain base: 100%\nwarning: a small")
    stream.write(" photo\n\nerror: subject 2 (tom): no photos\n")
    assert sink.text == ("[rank 1] train base: 100%\n[rank 1] warning: a small photo\n"
                         "error: [rank 1] subject 2 (tom): no photos\n")  # error lines start with 'error: '


# -- the queue in one process ----------------------------------------------------------------------------------


def test_a_subject_with_a_bad_photo_fails_alone_and_the_exit_code_says_so(tiny_cascade, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # this test's own class images, to count them
    path = three_subjects(tmp_path, tiny_cascade)
    result = dbfast("train", "--subjects", path)
    assert result.exit_code == 3, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "subject 2 (broken)" in errors[0] and "4.jpg" in errors[0], errors
    assert "Traceback" not in result.output
    for name in ("rex", "fido"):
        cascade = load_cascade(tmp_path / "runs" / name, stages=("base",))
        assert cascade.base_unet is not None
    assert not (tmp_path / "runs" / "broken").exists()
    summary = summary_of(path)
    assert summary["exit_code"] == 3 and summary["world_size"] == 1
    assert [(s["name"], s["status"], s["rank"]) for s in summary["subjects"]] == [
        ("rex", "done", 0), ("broken", "failed", 0), ("fido", "done", 0)]
    assert "4.jpg" in summary["subjects"][1]["error"] and summary["subjects"][1]["traceback"] is None
    assert set(summary["subjects"][0]["final_loss"]) == {"base"}
    table = result.output[result.output.index("#  subject"):]
    assert "2 of 3 subjects done, 1 failed" in table and "4.jpg" in table
    assert class_pngs() == 2  # the dogs' class images, drawn once for both


def test_resume_and_overwrite_over_a_queue(tiny_cascade, tmp_path):
    path = three_subjects(tmp_path, tiny_cascade)
    assert dbfast("train", "--subjects", path).exit_code == 3
    started = json.loads((tmp_path / "runs/rex/dreambooth.json").read_text())["started"]

    # Again without --resume or --overwrite: a finished output is refused per subject, nothing is touched.
    again = dbfast("train", "--subjects", path)
    assert again.exit_code == 3
    assert [s["status"] for s in summary_of(path)["subjects"]] == ["failed"] * 3
    assert "already holds a run" in summary_of(path)["subjects"][0]["error"]

    # --resume: finished runs are done (already); a run stopped before its first checkpoint continues; the
    # subject whose photo was fixed starts.
    (tmp_path / "broken" / "4.jpg").unlink()
    (tmp_path / "runs/fido/checkpoints/latest.json").unlink()
    resumed = dbfast("train", "--subjects", path, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert [s["status"] for s in summary_of(path)["subjects"]] == ["done (already)", "done", "done"]
    assert json.loads((tmp_path / "runs/rex/dreambooth.json").read_text())["started"] == started
    assert "3 of 3 subjects done" in resumed.output

    # --overwrite: every subject's run starts again from an empty output.
    marker = tmp_path / "runs/rex/logs/mine.txt"
    marker.write_text("from the first run")
    overwritten = dbfast("train", "--subjects", path, "--overwrite")
    assert overwritten.exit_code == 0, overwritten.output
    assert [s["status"] for s in summary_of(path)["subjects"]] == ["done"] * 3
    assert not marker.exists()


def test_resume_of_a_finished_subject_with_other_options_is_its_error(tiny_cascade, tmp_path):
    photos(tmp_path / "rex", (220, 20, 20))
    path = subjects_file(tmp_path, tiny_cascade, [{"images": "rex", "class": "dog", "output": "runs/rex"}])
    summary = tmp_path / "elsewhere" / "queue.json"
    assert dbfast("train", "--subjects", path, "--summary", summary).exit_code == 0
    assert json.loads(summary.read_text())["subjects"][0]["status"] == "done"
    result = dbfast("train", "--subjects", path, "--resume", "--lr", "3e-5", "--summary", summary)
    assert result.exit_code == 3
    assert "different options" in json.loads(summary.read_text())["subjects"][0]["error"]


def test_ctrl_c_stops_the_whole_queue(tiny_cascade, tmp_path):
    photos(tmp_path / "rex", (220, 20, 20))
    photos(tmp_path / "fido", (20, 20, 220))
    path = subjects_file(tmp_path, tiny_cascade, [
        {"images": "rex", "class": "dog", "output": "runs/rex", "steps": 100_000},  # still training at Ctrl-C
        {"images": "fido", "class": "dog", "output": "runs/fido"},
    ])
    ctrl_c = threading.Timer(8, os.kill, (os.getpid(), signal.SIGINT))
    ctrl_c.start()
    try:
        result = dbfast("train", "--subjects", path)
    finally:
        ctrl_c.cancel()
    assert result.exit_code in (2, 130), result.output  # 2: interrupted in training, checkpoint saved
    assert result.output.strip().splitlines()[-1].startswith("error: interrupted")
    assert not (tmp_path / "runs/fido").exists() and not path.with_name("subjects-summary.json").exists()


# -- the queue over two ranks (torchrun, gloo) ---------------------------------------------------------------


@pytest.mark.slow
def test_three_subjects_over_two_ranks_one_with_a_bad_photo(tiny_cascade, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # this test's own class images, to count them
    path = three_subjects(tmp_path, tiny_cascade)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # XDG_CACHE_HOME passed on
    # --standalone: torchrun finds a free port itself (it binds port 0).
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "dreambooth_fast", "train", "--subjects", str(path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    output = done.stdout + done.stderr
    # Every rank exits 3; torchrun turns a rank's non-zero exit into its own exit code 1, naming the rank's code.
    assert done.returncode != 0, output
    assert re.search(r"exitcode\s*:\s*3\b", output), output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "(broken)" in errors[0] and "4.jpg" in errors[0], errors
    assert re.match(r"error: \[rank [01]\] subject 2 \(broken\)", errors[0])
    for name in ("rex", "fido"):
        assert load_cascade(tmp_path / "runs" / name, stages=("base",)).base_unet is not None
    summary = summary_of(path)
    assert summary["world_size"] == 2 and summary["exit_code"] == 3
    subjects = summary["subjects"]
    assert [(s["name"], s["status"]) for s in subjects] == [("rex", "done"), ("broken", "failed"), ("fido", "done")]
    assert {s["rank"] for s in subjects} == {0, 1}  # each rank took a subject
    assert "2 of 3 subjects done, 1 failed" in done.stdout
    assert class_pngs() == 2  # the class shared by the two dogs was drawn once
