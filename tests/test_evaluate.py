"""`dbfast eval`: the DreamBooth prompt protocol, the metrics' maths, and the plumbing from local encoder
directories to the results table. The encoders are tiny random CLIP and ViT models saved here with
save_pretrained and read back through the real loading code."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from dreambooth_fast.cli import main
from dreambooth_fast.data import load_subject_images
from dreambooth_fast.errors import UserError
from dreambooth_fast.evaluate.encoders import load_clip, load_dino, load_lpips, to_tensor
from dreambooth_fast.evaluate.metrics import (
    DIV_FALLBACK,
    DIV_LPIPS,
    cross_similarity,
    mean_pairwise_lpips,
    paired_similarity,
    within_similarity,
)
from dreambooth_fast.evaluate.prompts import LIVE_TEMPLATES, OBJECT_TEMPLATES, eval_prompts, pres_prompt
from dreambooth_fast.evaluate.protocol import (
    MANIFEST,
    MANIFEST_FORMAT,
    format_table,
    generate_eval_images,
    run_eval,
    score_generated,
    subject_of,
)

# ---- tiny encoders --------------------------------------------------------------------------------------


def _save_tiny_clip(path):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in list(letters) + [c + "</w>" for c in letters]:
        vocab[token] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(path)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _save_tiny_dino(path):
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4)
    torch.manual_seed(1)
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return _save_tiny_clip(root / "clip"), _save_tiny_dino(root / "dino")


@pytest.fixture(scope="module")
def encoders(encoder_dirs):
    return load_clip(encoder_dirs[0]), load_dino(encoder_dirs[1])


def _alexnet_features() -> torch.nn.Sequential:
    """torchvision's AlexNet `features`, layer for layer, so its state dict has torchvision's key names."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
    )


@pytest.fixture(scope="module")
def lpips_dir(tmp_path_factory):
    """Random weights in the two files `--lpips` reads: torchvision AlexNet (.pth) and lpips' linear layers."""
    path = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(2)
    backbone = {f"features.{k}": v for k, v in _alexnet_features().state_dict().items()}
    backbone["classifier.1.weight"] = torch.zeros(4, 4)  # present in torchvision's file, ignored
    torch.save(backbone, path / "alexnet.pth")
    linear = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate([64, 192, 384, 256, 256])}
    save_file(linear, path / "lpips_alex.safetensors")
    return path


def _image(colour, size=48) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def _noise_image(seed, size=48) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy())


def _write_generated(folder, subject: dict[str, list[Image.Image]], class_images=None, clip_texts=None):
    """A --generated directory in the documented layout: one folder per prompt and a manifest."""
    entries = []
    for i, (prompt, images) in enumerate(subject.items()):
        (folder / f"{i:02d}").mkdir(parents=True)
        names = [f"{i:02d}/{k:04d}.png" for k in range(len(images))]
        for name, image in zip(names, images):
            image.save(folder / name)
        entries.append({"prompt": prompt, "images": names}
                       | ({"clip_text": clip_texts[i]} if clip_texts else {}))
    manifest = {"format": MANIFEST_FORMAT, "subject": entries}
    if class_images is not None:
        (folder / "class").mkdir()
        for k, image in enumerate(class_images):
            image.save(folder / "class" / f"{k}.png")
        manifest["class"] = {"prompt": "a dog", "images": [f"class/{k}.png" for k in range(len(class_images))]}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


# ---- prompts --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("live", [False, True])
def test_each_subject_kind_has_25_distinct_prompts(live):
    prompts = eval_prompts("sks", "dog", live=live)
    assert len(prompts) == 25
    assert len(set(prompts)) == 25
    assert all("sks dog" in p for p in prompts)


def test_prompts_exact_text():
    objects = eval_prompts("sks", "backpack")
    assert objects[0] == "a sks backpack in the jungle"
    assert objects[9] == "a sks backpack on top of a purple rug in a forest"
    assert objects[12] == "a sks backpack with the Eiffel Tower in the background"
    assert objects[19] == "a sks backpack on top of a white rug"
    assert objects[24] == "a cube shaped sks backpack"
    live = eval_prompts("sks", "dog", live=True)
    assert live[10] == "a sks dog wearing a red hat"
    assert live[13] == "a sks dog wearing a black top hat and a monocle"
    assert live[19] == "a sks dog in a purple wizard outfit"
    assert live[20:] == ["a red sks dog", "a purple sks dog", "a shiny sks dog", "a wet sks dog",
                         "a cube shaped sks dog"]


def test_object_and_live_lists_share_prompts_1_to_10_and_21_to_25_only():
    assert OBJECT_TEMPLATES[:10] == LIVE_TEMPLATES[:10]
    assert OBJECT_TEMPLATES[20:] == LIVE_TEMPLATES[20:]
    assert not set(OBJECT_TEMPLATES[10:20]) & set(LIVE_TEMPLATES[10:20])


def test_pres_prompt_and_identifier_free_text():
    assert pres_prompt("dog") == "a dog"
    assert eval_prompts("", "dog", live=True)[0] == "a dog in the jungle"
    assert eval_prompts("", "dog", live=True)[20] == "a red dog"


# ---- similarity maths -----------------------------------------------------------------------------------


def test_identical_embeddings_score_one_and_orthogonal_zero():
    x = torch.randn(3, 8)
    assert cross_similarity(x[:1], x[:1]) == pytest.approx(1.0)
    assert cross_similarity(x[:1].expand(4, -1), 2.5 * x[:1]) == pytest.approx(1.0)  # scale does not matter
    assert cross_similarity(torch.eye(4)[:2], torch.eye(4)[2:]) == pytest.approx(0.0, abs=1e-12)
    assert paired_similarity(torch.eye(3), torch.eye(3)) == pytest.approx(1.0)


def test_pairwise_means_by_hand():
    # Every (row of a, row of b) pair: cos([1,0],[1,1]) = cos([0,1],[1,1]) = 1/sqrt(2); the mean is the same.
    assert cross_similarity(torch.eye(2), torch.tensor([[1.0, 1.0]])) == pytest.approx(1 / math.sqrt(2))
    # Unordered distinct pairs of [1,0], [0,1], [1,1]: 0, 1/sqrt(2), 1/sqrt(2) -> mean sqrt(2)/3.
    assert within_similarity(torch.tensor([[1.0, 0], [0, 1], [1, 1]])) == pytest.approx(math.sqrt(2) / 3)
    # [1,0] vs [1,0] and [-1,0]: +1 and -1 -> 0; rows paired one to one: cos 1 and cos 0 -> 0.5.
    assert cross_similarity(torch.tensor([[1.0, 0]]), torch.tensor([[1.0, 0], [-1, 0]])) == pytest.approx(0.0)
    assert paired_similarity(torch.eye(2), torch.tensor([[1.0, 0], [1, 0]])) == pytest.approx(0.5)


def test_within_similarity_needs_two_rows():
    with pytest.raises(ValueError):
        within_similarity(torch.ones(1, 4))


# ---- encoders -------------------------------------------------------------------------------------------


def test_encoders_load_from_local_dirs_with_pil_processors(encoders):
    clip, dino = encoders
    assert type(clip.processor).__name__ == "CLIPImageProcessorPil"
    assert type(dino.processor).__name__ == "ViTImageProcessorPil"
    assert "pooler" not in dict(dino.model.named_modules())


def test_identical_images_score_one_through_both_encoders(encoders):
    clip, dino = encoders
    image = _noise_image(0)
    for encoder in (clip, dino):
        a, b = encoder.embed([image, image.copy()]), encoder.embed([image])
        assert a.shape[0] == 2
        assert cross_similarity(a, b) == pytest.approx(1.0, abs=1e-6)
        assert cross_similarity(encoder.embed([_noise_image(1)]), b) < 1 - 1e-4


def test_clip_text_embeddings_match_the_image_embedding_size(encoders):
    clip, _ = encoders
    texts = clip.embed_texts(["a dog in the jungle", "a red dog"])
    assert texts.shape == (2, clip.model.config.projection_dim)
    assert cross_similarity(texts[:1], texts[1:]) < 1 - 1e-4


def test_encoder_dir_mistakes_are_user_errors(tmp_path, encoder_dirs):
    clip_dir, dino_dir = encoder_dirs
    with pytest.raises(UserError, match="--clip .*config.json"):
        load_clip(tmp_path)
    with pytest.raises(UserError, match="--dino .*CLIP model"):
        load_dino(clip_dir)
    with pytest.raises(UserError, match="--clip .*CLIPModel"):
        load_clip(dino_dir)
    shutil.copytree(dino_dir, tmp_path / "no_processor")
    (tmp_path / "no_processor" / "preprocessor_config.json").unlink()
    with pytest.raises(UserError, match="preprocessor_config.json"):
        load_dino(tmp_path / "no_processor")
    shutil.copytree(dino_dir, tmp_path / "no_weights")
    (tmp_path / "no_weights" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="--dino .*cannot load it"):
        load_dino(tmp_path / "no_weights")


# ---- LPIPS ----------------------------------------------------------------------------------------------


def _lpips_reference(lpips_dir, a, b):
    """The lpips package's formula, written over a torchvision-layout AlexNet loaded strictly by key name."""
    features = _alexnet_features()
    backbone = torch.load(lpips_dir / "alexnet.pth", weights_only=True)
    features.load_state_dict({k.removeprefix("features."): v for k, v in backbone.items() if "features" in k})
    from safetensors.torch import load_file

    linear = load_file(lpips_dir / "lpips_alex.safetensors")
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    slices = [features[0:2], features[2:5], features[5:8], features[8:10], features[10:12]]
    total = 0.0
    ha, hb = (a - shift) / scale, (b - shift) / scale
    with torch.no_grad():
        for k, layer in enumerate(slices):
            ha, hb = layer(ha), layer(hb)
            na = ha / (ha.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = hb / (hb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + torch.nn.functional.conv2d((na - nb) ** 2, linear[f"lin{k}.model.1.weight"]).mean((2, 3))
    return total.flatten()


def test_lpips_matches_the_lpips_formula_over_torchvision_alexnet(lpips_dir):
    net = load_lpips(lpips_dir)
    a, b = to_tensor(_noise_image(3, 64)), to_tensor(_noise_image(4, 64))
    torch.testing.assert_close(net(a, b), _lpips_reference(lpips_dir, a, b), atol=1e-6, rtol=1e-5)


def test_lpips_is_zero_for_identical_images_and_symmetric(lpips_dir):
    net = load_lpips(lpips_dir)
    same = [_noise_image(5, 32)] * 3
    assert mean_pairwise_lpips(net, same) == pytest.approx(0.0, abs=1e-7)
    x, y = _noise_image(5, 32), _noise_image(6, 32)
    assert mean_pairwise_lpips(net, [x, y]) > 0
    assert mean_pairwise_lpips(net, [x, y]) == pytest.approx(mean_pairwise_lpips(net, [y, x]))
    # Three images: the mean of the three pairwise distances.
    z = _noise_image(7, 32)
    pairs = [mean_pairwise_lpips(net, p) for p in ([x, y], [x, z], [y, z])]
    assert mean_pairwise_lpips(net, [x, y, z]) == pytest.approx(sum(pairs) / 3, rel=1e-5)


def test_lpips_dir_mistakes_are_user_errors(tmp_path, lpips_dir):
    with pytest.raises(UserError, match="lpips_alex.safetensors or lpips_alex.pth is missing"):
        shutil.copy(lpips_dir / "alexnet.pth", tmp_path / "alexnet.pth")
        load_lpips(tmp_path)
    save_file({"lin0.model.1.weight": torch.ones(1, 64, 1, 1)}, tmp_path / "lpips_alex.safetensors")
    with pytest.raises(UserError, match="lack lins.1.weight"):
        load_lpips(tmp_path)
    (tmp_path / "alexnet.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="alexnet.pth: not a plain state dict"):
        load_lpips(tmp_path)


# ---- scoring a --generated directory --------------------------------------------------------------------


def test_identical_generated_and_real_images_score_one(tmp_path, encoders):
    clip, dino = encoders
    image = _noise_image(8)
    (tmp_path / "real").mkdir()
    image.save(tmp_path / "real" / "only.png")
    generated = _write_generated(tmp_path / "gen", {"a sks dog": [image] * 2, "a red sks dog": [image] * 2},
                                 class_images=[image])
    results = score_generated(generated, tmp_path / "real", clip, dino)
    metrics = results["metrics"]
    assert metrics["DINO"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["CLIP-I"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["PRES"] == pytest.approx(1.0, abs=1e-6)
    assert metrics[DIV_FALLBACK] == pytest.approx(0.0, abs=1e-6)
    assert -1 <= metrics["CLIP-T"] <= 1
    assert results["real_images"] == {"DINO": None, "CLIP-I": None}  # one real image: no pairs


def test_div_fallback_is_named_as_such(tmp_path, encoders, dog_photos):
    clip, dino = encoders
    generated = _write_generated(tmp_path / "gen", {"a sks dog": [_noise_image(9), _noise_image(10)]})
    results = score_generated(generated, dog_photos, clip, dino)
    assert results["div_metric"] == DIV_FALLBACK == "DIV (1-DINO)"
    assert DIV_LPIPS not in results["metrics"]
    assert "1 - mean DINO cosine" in results["div_definition"]
    table = format_table(results)
    assert "DIV (1-DINO)" in table and "not the paper's LPIPS-based DIV" in table
    assert results["metrics"]["PRES"] is None  # no class prompt in the manifest


def test_score_with_lpips_reports_div(tmp_path, encoders, lpips_dir, dog_photos):
    clip, dino = encoders
    images = [_noise_image(11, 64), _noise_image(12, 64)]
    generated = _write_generated(tmp_path / "gen", {"a sks dog": images})
    results = score_generated(generated, dog_photos, clip, dino, load_lpips(lpips_dir))
    assert results["div_metric"] == DIV_LPIPS
    assert results["metrics"][DIV_LPIPS] == pytest.approx(mean_pairwise_lpips(load_lpips(lpips_dir), images))
    assert DIV_FALLBACK not in format_table(results)


def test_scores_against_the_real_dog_photos(tmp_path, encoders, dog_photos):
    clip, dino = encoders
    prompts = eval_prompts("sks", "dog", live=True)[:3]
    subject = {p: [_noise_image(20 + 2 * i), _noise_image(21 + 2 * i)] for i, p in enumerate(prompts)}
    generated = _write_generated(tmp_path / "gen", subject, class_images=[_noise_image(30)],
                                 clip_texts=eval_prompts("", "dog", live=True)[:3])
    results = score_generated(generated, dog_photos, clip, dino)
    assert results["counts"] == {"real": 5, "prompts": 3, "generated": 6, "class": 1}
    rows = results["per_prompt"]
    assert [r["prompt"] for r in rows] == prompts
    # With equal images per prompt the overall DINO is the mean of the per-prompt values.
    assert results["metrics"]["DINO"] == pytest.approx(sum(r["DINO"] for r in rows) / 3)
    assert results["metrics"][DIV_FALLBACK] == pytest.approx(sum(r[DIV_FALLBACK] for r in rows) / 3)
    for value in [*results["metrics"].values(), *results["real_images"].values()]:
        assert -1 <= value <= 2
    table = format_table(results)
    for row in ("this model", "paper: DreamBooth (Imagen)", "0.696", "0.812", "0.306", "0.493", "0.371"):
        assert row in table


def test_generated_dir_mistakes_are_user_errors(tmp_path, encoders, dog_photos):
    clip, dino = encoders
    with pytest.raises(UserError, match="no manifest.json"):
        score_generated(tmp_path, dog_photos, clip, dino)
    generated = _write_generated(tmp_path / "gen", {"a sks dog": [_noise_image(0)]})
    with pytest.raises(UserError, match=r"--real-images .*no \.jpg/\.jpeg/\.png/\.webp files"):
        score_generated(generated, tmp_path / "gen", clip, dino)
    (generated / "00" / "0000.png").unlink()
    with pytest.raises(UserError, match="does not exist"):
        score_generated(generated, dog_photos, clip, dino)
    (generated / MANIFEST).write_text("{")
    with pytest.raises(UserError, match="manifest.json: not valid JSON"):
        score_generated(generated, dog_photos, clip, dino)


# ---- the real photos are read as training reads them (dreambooth_fast.data) -------------------------------


def _deep_grey_photo() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 65536, (48, 48), dtype=np.uint16))


def _half_transparent_photo() -> Image.Image:
    pixels = np.random.default_rng(1).integers(0, 256, (48, 48, 4), dtype=np.uint8)
    pixels[:, :24, 3] = 0  # left half fully transparent: its colours are not part of the picture
    pixels[:, 24:, 3] = 255
    return Image.fromarray(pixels, mode="RGBA")


@pytest.mark.parametrize("photo", [_deep_grey_photo, _half_transparent_photo], ids=["16-bit grey", "RGBA"])
def test_real_photos_score_the_pixels_training_sees(tmp_path, encoders, photo):
    clip, dino = encoders
    (tmp_path / "real").mkdir()
    photo().save(tmp_path / "real" / "photo.png")
    [trained_on] = load_subject_images(tmp_path / "real")
    generated = _write_generated(tmp_path / "gen", {"a sks dog": [trained_on.image]})
    metrics = score_generated(generated, tmp_path / "real", clip, dino)["metrics"]
    assert metrics["DINO"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["CLIP-I"] == pytest.approx(1.0, abs=1e-6)


def test_real_images_are_the_files_training_reads(tmp_path, encoders):
    clip, dino = encoders
    (tmp_path / "real").mkdir()
    _noise_image(0).save(tmp_path / "real" / "a.png")
    _noise_image(1).save(tmp_path / "real" / "b.bmp")  # not a format training reads
    generated = _write_generated(tmp_path / "gen", {"a sks dog": [_noise_image(2)]})
    with pytest.warns(UserWarning, match="b.bmp"):
        results = score_generated(generated, tmp_path / "real", clip, dino)
    assert results["counts"]["real"] == 1


def test_cli_names_a_broken_link_among_the_real_images(tmp_path, encoder_dirs):
    (tmp_path / "real").mkdir()
    _noise_image(0).save(tmp_path / "real" / "a.png")
    (tmp_path / "real" / "b.jpg").symlink_to(tmp_path / "deleted.jpg")
    generated = _write_generated(tmp_path / "gen", {"a sks dog": [_noise_image(1)]})
    result = CliRunner().invoke(main, ["eval", "--generated", str(generated), "--real-images", str(tmp_path / "real"),
                                       "--clip", str(encoder_dirs[0]), "--dino", str(encoder_dirs[1])])
    assert result.exit_code == 2, result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("error: ") and "b.jpg: broken symbolic link" in message
    assert "Traceback" not in result.output and "--skip-bad-images" not in message  # not an eval option


def test_cli_scores_a_generated_dir(tmp_path, encoder_dirs, dog_photos):
    generated = _write_generated(tmp_path / "gen", {"a sks dog": [_noise_image(0), _noise_image(1)]},
                                 class_images=[_noise_image(2)])
    out = tmp_path / "results.json"
    args = ["eval", "--generated", str(generated), "--real-images", str(dog_photos), "--clip", str(encoder_dirs[0]),
            "--dino", str(encoder_dirs[1]), "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "paper: Textual Inversion" in result.output and "DIV (1-DINO)" in result.output
    saved = json.loads(out.read_text())
    assert set(saved["metrics"]) == {"DINO", "CLIP-I", "CLIP-T", "PRES", DIV_FALLBACK}

    result = CliRunner().invoke(main, args[:-4] + ["--dino", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: --dino") and "Traceback" not in result.output


# ---- generation on the tiny cascade ---------------------------------------------------------------------


@pytest.mark.slow
def test_eval_command_end_to_end_on_the_tiny_cascade(tmp_path, tiny_cascade, encoder_dirs, dog_photos):
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(tiny_cascade), "--real-images", str(dog_photos), "--clip", str(encoder_dirs[0]),
            "--dino", str(encoder_dirs[1]), "--live", "--n", "2", "--out", str(out), "--identifier", "sks",
            "--class", "dog", "--steps", "2", "--sr-steps", "2", "--batch-size", "52", "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "this model" in result.output and "paper: DreamBooth (Imagen)" in result.output
    results = json.loads(out.read_text())
    assert results["counts"] == {"real": 5, "prompts": 25, "generated": 50, "class": 2}
    assert all(results["metrics"][k] is not None for k in ("DINO", "CLIP-I", "CLIP-T", "PRES", DIV_FALLBACK))
    images_dir = tmp_path / "eval-images"
    manifest = json.loads((images_dir / MANIFEST).read_text())
    assert manifest["subject"][0]["prompt"] == "a sks dog in the jungle"
    assert manifest["subject"][0]["clip_text"] == "a dog in the jungle"
    assert manifest["subject"][10]["prompt"] == "a sks dog wearing a red hat"
    assert manifest["class"]["prompt"] == "a dog"
    with Image.open(images_dir / manifest["subject"][0]["images"][0]) as im:
        assert im.size == (64, 64)  # the stage II size: the whole cascade ran
    # The generated directory can be scored again on its own, to the same numbers.
    again, _ = run_eval(None, dog_photos, *encoder_dirs, generated=images_dir, out=tmp_path / "again.json",
                        device="cpu", progress=False)
    assert again["metrics"] == pytest.approx(results["metrics"])


@pytest.mark.slow
def test_each_image_has_its_own_seed_whatever_the_batching(tmp_path, tiny_cascade):
    prompts = ["a sks dog on the beach"] * 2  # one image each: seeds 0 and 1
    kwargs = dict(base_steps=2, sr_steps=2, device="cpu", progress=False)
    first = generate_eval_images(tiny_cascade, prompts, 1, tmp_path / "a", batch_size=2, **kwargs)
    second = generate_eval_images(tiny_cascade, prompts, 1, tmp_path / "b", batch_size=1, **kwargs)
    assert first == [[tmp_path / "a" / "00" / "0000.png"], [tmp_path / "a" / "01" / "0000.png"]]

    def pixels(paths):
        with Image.open(paths[0]) as im:
            return torch.from_numpy(np.asarray(im, dtype=np.int16).copy())

    for a, b in zip(first, second):
        # Batched kernels may round differently: allow one level of 255 in a pixel, no more.
        assert (pixels(a) - pixels(b)).abs().max() <= 1
    assert (pixels(first[0]) - pixels(first[1])).abs().max() > 1


def test_identifier_and_class_come_from_the_run_file(tmp_path, tiny_cascade, encoder_dirs, dog_photos):
    (tmp_path / "dreambooth.json").write_text(json.dumps({"identifier": "zq", "class_noun": "dog", "steps": 3}))
    assert subject_of(tmp_path) == ("zq", "dog")
    assert subject_of(tiny_cascade) == (None, None)
    with pytest.raises(UserError, match="pass --identifier and --class"):
        run_eval(tiny_cascade, dog_photos, *encoder_dirs, out=tmp_path / "e.json", progress=False)


def test_eval_on_a_stable_diffusion_model_draws_with_its_pipeline_defaults_beside_the_papers_sd_row(
        tmp_path, tiny_sd, encoder_dirs, dog_photos, monkeypatch):
    """StableDiffusionPipeline's 50 steps at guidance 7.5 (IF's are 100 at 7), and the paper's Stable Diffusion row
    (Table 1) first among the paper's, marked."""
    from dreambooth_fast import sample

    drawn = []
    sample_base = sample.sample_base
    monkeypatch.setattr(sample, "sample_base", lambda *args, **kw: drawn.append((kw["steps"], kw["guidance_scale"]))
                        or sample_base(*args, **kw))
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(tiny_sd), "--real-images", str(dog_photos), "--clip", str(encoder_dirs[0]),
            "--dino", str(encoder_dirs[1]), "--n", "1", "--out", str(out), "--identifier", "dt", "--class", "dog",
            "--batch-size", "26", "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert drawn == [(50, 7.5)]  # 25 prompts and the PRES prompt in one call
    results = json.loads(out.read_text())
    assert results["family"] == "sd" and results["sampling"]["base_steps"] == 50
    assert results["counts"] == {"real": 5, "prompts": 25, "generated": 25, "class": 1}
    lines = result.output.splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("this model")):]
    assert lines[1].startswith("real images (this subject)")
    assert lines[2].startswith("paper: DreamBooth (Stable Diffusion) <- same family")
    assert "0.668" in lines[2] and "0.803" in lines[2] and "0.305" in lines[2]
    assert lines[3].startswith("paper: real images") and "0.774" in lines[3] and "0.885" in lines[3]
    with Image.open(tmp_path / "eval-images" / "00" / "0000.png") as im:
        assert im.size == (32, 32)  # the base latents decoded by the VAE


def test_the_paper_row_of_the_models_family_comes_first(tmp_path):
    results = {"metrics": {}, "real_images": {}, "div_metric": DIV_LPIPS, "family": "if"}
    lines = format_table(results).splitlines()
    assert lines[3].startswith("paper: DreamBooth (Imagen) <- same family")
    assert "same family" not in format_table({**results, "family": None})


@pytest.mark.parametrize("family, expected", [
    ("if", {"base_steps": 100, "base_guidance": 7.0, "sr_steps": 50, "sr_guidance": 4.0}),  # IFPipeline, stage II
    ("sd", {"base_steps": 50, "base_guidance": 7.5, "sr_steps": 50, "sr_guidance": 9.0}),  # SD, its x4 upscaler
    ("sdxl", {"base_steps": 50, "base_guidance": 5.0, "sr_steps": 50, "sr_guidance": 4.0}),  # no SR stage
])
def test_each_family_is_drawn_at_its_own_pipelines_defaults(family, expected):
    from dreambooth_fast.evaluate.protocol import sampling_settings

    assert sampling_settings(family) == expected
    assert sampling_settings(family, base_steps=7)["base_steps"] == 7
