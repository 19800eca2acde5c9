"""dbfast export: ONNX graphs of the tiny cascade's UNets, parity with PyTorch, manifests and staleness,
batch profiles, and the message when TensorRT is missing (it is, on the machines these tests run on)."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from dreambooth_fast.cli import main
from dreambooth_fast.errors import UserError
from dreambooth_fast.export import export_cascade, load_preset, make_unet_runner, parse_batch_sizes
from dreambooth_fast.export.manifest import (
    engine_action,
    engine_cache_key,
    manifest_path,
    onnx_action,
    read_manifest,
    stale_reasons,
    weights_record,
)
from dreambooth_fast.export.onnx_export import OUTPUT_NAME, UNetSpec, export_unet_onnx, unet_spec
from dreambooth_fast.export.parity import TOLERANCES, check_parity, reference_cases
from dreambooth_fast.export.profiles import BatchSizes, parity_batch_sizes, unet_batch_sizes
from dreambooth_fast.export.runners import OnnxRunner
from dreambooth_fast.export.tensorrt_build import INSTALL_COMMAND
from dreambooth_fast.lora import LORA_WEIGHTS
from dreambooth_fast.models import load_cascade, load_unet, weights_files
from dreambooth_fast.sample import generate_cascade, torch_unet_fn

PRESETS = Path(__file__).resolve().parents[1] / "export" / "presets"
STAGES = {"base": "", "sr": "stage_2"}
no_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")


def stage_dir(cascade: Path, stage: str) -> Path:
    return cascade / STAGES[stage]


@pytest.fixture(scope="module")
def exported(tiny_cascade, tmp_path_factory) -> Path:
    """`dbfast export --onnx` of the tiny cascade, once for this module."""
    out = tmp_path_factory.mktemp("export") / "out"
    result = CliRunner().invoke(main, ["export", "--model", str(tiny_cascade), "--onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_export_writes_a_checked_onnx_graph_per_stage_with_named_inputs_and_dynamic_batch(exported):
    for stage, names in [("base", ["sample", "timestep", "encoder_hidden_states"]),
                         ("sr", ["sample", "timestep", "encoder_hidden_states", "class_labels"])]:
        path = exported / stage / "unet.fp32.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
        assert [i.name for i in model.graph.input] == names
        assert [o.name for o in model.graph.output] == [OUTPUT_NAME]
        for value in [*model.graph.input, *model.graph.output]:
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
        assert not (exported / stage / "unet.fp32.onnx.data").exists()


def test_manifest_records_weights_opset_and_parity_within_tolerance(exported, tiny_cascade):
    for stage in STAGES:
        manifest = read_manifest(manifest_path(exported / stage / "unet.fp32.onnx"))
        assert manifest["precision"] == "fp32" and manifest["opset"] == 18
        assert manifest["weights_sha256"] == weights_record(stage_dir(tiny_cascade, stage))["sha256"]
        assert [p["batch"] for p in manifest["parity"]] == [1, 2]
        for p in manifest["parity"]:
            assert p["max_abs"] <= TOLERANCES["fp32"].max_abs and p["cosine"] >= TOLERANCES["fp32"].min_cosine


@pytest.mark.parametrize("stage", ["base", "sr"])
def test_onnx_runner_matches_torch_at_two_batch_sizes(exported, tiny_cascade, stage):
    unet = load_unet(stage_dir(tiny_cascade, stage))
    runner = make_unet_runner("onnx", stage, exported, stage_dir=stage_dir(tiny_cascade, stage))
    spec = unet_spec(unet)
    for batch in (1, 3):
        inputs = spec.example_inputs(batch, seed=batch)
        # The sampler passes int64 timesteps and noise levels; the runner casts them for the graph.
        inputs["timestep"] = torch.full((batch,), 500, dtype=torch.int64)
        if "class_labels" in inputs:
            inputs["class_labels"] = torch.full((batch,), 250, dtype=torch.int64)
        with torch.no_grad():
            expected = torch_unet_fn(unet)(**inputs)
        actual = runner(**inputs)
        assert actual.shape == expected.shape == (batch, 6, spec.sample_size, spec.sample_size)
        assert (actual - expected).abs().max() < 1e-4


@pytest.mark.parametrize("threads", [1, 2])
def test_onnx_runner_uses_torchs_thread_count_with_sleeping_workers(exported, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runner = make_unet_runner("onnx", "base", exported)
    finally:
        torch.set_num_threads(before)
    options = runner.session.get_session_options()
    assert options.intra_op_num_threads == threads
    assert options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_onnx_runner_hands_float32_cpu_inputs_over_without_a_copy(exported, tiny_cascade):
    """The sample reaches ONNX Runtime as a numpy view of the tensor's memory (nothing to save with IO binding)."""
    runner = make_unet_runner("onnx", "base", exported)
    inputs = unet_spec(load_unet(tiny_cascade)).example_inputs(2)
    feed = runner.feed(**inputs)
    assert np.shares_memory(feed["sample"], inputs["sample"].numpy())
    assert np.shares_memory(feed["encoder_hidden_states"], inputs["encoder_hidden_states"].numpy())


def test_onnx_generation_matches_torch_generation_for_a_fixed_seed(exported, tiny_cascade):
    """Tolerance: 1e-3 on images in [-1, 1] (per-step UNet differences are ~1e-6)."""
    cascade = load_cascade(tiny_cascade)
    runners = {stage: make_unet_runner("onnx", stage, exported) for stage in STAGES}
    kwargs = dict(base_steps=3, sr_steps=2, progress=False)
    torch_images = generate_cascade(cascade, ["a red star"], generator=torch.Generator().manual_seed(7), **kwargs)
    onnx_images = generate_cascade(cascade, ["a red star"], base_unet_fn=runners["base"], sr_unet_fn=runners["sr"],
                                   generator=torch.Generator().manual_seed(7), **kwargs)
    for stage in STAGES:
        assert (onnx_images[stage] - torch_images[stage]).abs().max() < 1e-3


def test_eval_images_from_the_onnx_backend_load_no_torch_unet_and_match_torch(exported, tiny_cascade, tmp_path,
                                                                            monkeypatch):
    from PIL import Image

    from dreambooth_fast import models
    from dreambooth_fast.evaluate import generate_eval_images

    kwargs = dict(base_steps=3, sr_steps=2, progress=False)
    torch_paths = generate_eval_images(tiny_cascade, ["a red star"], 2, tmp_path / "torch", **kwargs)

    def no_torch_unet(*args, **kwargs):
        raise AssertionError("an exported backend loaded a torch UNet")

    monkeypatch.setattr(models, "load_unet", no_torch_unet)
    onnx_paths = generate_eval_images(tiny_cascade, ["a red star"], 2, tmp_path / "onnx", backend="onnx",
                                      export_dir=exported, **kwargs)
    for a, b in zip(torch_paths[0], onnx_paths[0]):
        diff = np.abs(np.asarray(Image.open(a), int) - np.asarray(Image.open(b), int))
        assert diff.max() <= 1  # one grey level: rounding of values ~1e-6 apart


def test_second_export_keeps_what_is_up_to_date(exported, tiny_cascade):
    path = exported / "base" / "unet.fp32.onnx"
    before = path.stat().st_mtime_ns
    result = CliRunner().invoke(main, ["export", "--model", str(tiny_cascade), "--onnx", "--out", str(exported)])
    assert result.exit_code == 0, result.output
    assert result.output.count("up to date") == 2
    assert path.stat().st_mtime_ns == before


def test_forced_external_data_fp16_export_loads_runs_and_is_within_fp16_tolerance(tiny_cascade, tmp_path):
    reference = load_unet(tiny_cascade)
    spec = unet_spec(reference)
    cases = reference_cases(torch_unet_fn(reference), spec, (1, 2))
    unet = load_unet(tiny_cascade).half()
    files = export_unet_onnx(unet, spec, tmp_path / "unet.fp16.onnx", external_data_threshold=1)
    assert files == [tmp_path / "unet.fp16.onnx", tmp_path / "unet.fp16.onnx.data"]
    assert files[1].stat().st_size > 0
    model = onnx.load(str(files[0]), load_external_data=False)
    assert any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    onnx.checker.check_model(str(files[0]))
    results = check_parity(cases, OnnxRunner(files[0]), TOLERANCES["fp16"], "fp16 test export")
    assert [r.batch for r in results] == [1, 2]


def test_parity_past_tolerance_is_a_user_error_with_the_numbers():
    spec = UNetSpec(in_channels=3, sample_size=4, text_dim=8, has_class_labels=False)
    cases = reference_cases(lambda **inputs: inputs["sample"], spec, (1, 2))
    results = check_parity(cases, lambda **inputs: inputs["sample"] + 1e-4, TOLERANCES["fp32"], "test export")
    assert [(r.batch, round(r.max_abs, 6)) for r in results] == [(1, 1e-4), (2, 1e-4)]
    with pytest.raises(UserError, match=r"test export: parity check against PyTorch failed at batch 1: max abs error "
                                        r"0\.1, .*\(tolerance: max abs error <= 0\.001, cosine >= 0\.99999\)"):
        check_parity(cases, lambda **inputs: inputs["sample"] + 0.1, TOLERANCES["fp32"], "test export")
    with pytest.raises(UserError, match="failed at batch 1: max abs error nan"):
        check_parity(cases, lambda **inputs: inputs["sample"] * float("nan"), TOLERANCES["fp32"], "test export")


def test_export_from_changed_weights_is_refused_and_a_faithful_copy_is_not(exported, tiny_cascade, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_cascade, copy, ignore=shutil.ignore_patterns("stage_2", "export"))
    make_unet_runner("onnx", "base", exported, stage_dir=copy)  # new mtimes, same bytes: re-hashed, accepted
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    name = next(iter(state))
    state[name] = state[name] + 1
    save_file(state, weights)
    with pytest.raises(UserError, match=r"stale \(weights .* -> .*\); run `dbfast export --model MODEL --onnx`"):
        make_unet_runner("onnx", "base", exported, stage_dir=copy)


def test_missing_export_is_a_user_error(tmp_path, tiny_cascade):
    with pytest.raises(UserError, match="no base export here"):
        make_unet_runner("onnx", "base", tmp_path, stage_dir=tiny_cascade)


ENGINE = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
          "precision": "fp16", "profile": {"min": 1, "opt": 8, "max": 16}, "opset": 18, "weights_sha256": "a" * 64,
          "refittable": False}


def built(fields: dict) -> dict:
    return {**fields, "cache_key": engine_cache_key(fields)}


@pytest.mark.parametrize("field, value", [("tensorrt_version", "10.4.0"), ("gpu_name", "NVIDIA A100-SXM4-80GB"),
                                          ("compute_capability", "8.0"), ("precision", "fp32"),
                                          ("profile", {"min": 1, "opt": 2, "max": 8}), ("opset", 19),
                                          ("weights_sha256", "b" * 64), ("refittable", True)])
def test_engine_cache_key_changes_with_every_field_and_the_engine_is_rebuilt(field, value):
    changed = {**ENGINE, field: value}
    assert engine_cache_key(changed) != engine_cache_key(ENGINE)
    action, reasons = engine_action(built(ENGINE), changed)
    assert action == "build" and len(reasons) == 1


def test_engine_is_reused_when_nothing_changed_and_built_when_there_is_none():
    assert engine_cache_key(dict(ENGINE)) == engine_cache_key(ENGINE)
    assert engine_action(built(ENGINE), ENGINE) == ("reuse", [])
    assert engine_action(None, ENGINE) == ("build", ["no engine yet"])


def test_refittable_engine_is_refit_when_only_the_weights_changed():
    refittable = {**ENGINE, "refittable": True}
    new_weights = {**refittable, "weights_sha256": "b" * 64}
    action, reasons = engine_action(built(refittable), new_weights)
    assert action == "refit" and reasons == ["weights aaaaaaaaaaaa -> bbbbbbbbbbbb"]
    assert engine_action(built(refittable), {**new_weights, "gpu_name": "other"})[0] == "build"


@pytest.mark.parametrize("field, value, reason", [
    ("weights_sha256", "b" * 64, "weights aaaaaaaaaaaa -> bbbbbbbbbbbb"),
    ("tensorrt_version", "10.4.0", "TensorRT version 10.3.0 -> 10.4.0"),
    ("gpu_name", "NVIDIA L4", "GPU NVIDIA H100 80GB HBM3 -> NVIDIA L4"),
    ("compute_capability", "8.9", "compute capability 9.0 -> 8.9"),
])
def test_engine_is_stale_at_load_time_when_weights_tensorrt_or_gpu_differ(field, value, reason):
    current = {k: ENGINE[k] for k in ("tensorrt_version", "gpu_name", "compute_capability", "weights_sha256")}
    assert stale_reasons(built(ENGINE), current) == []
    assert stale_reasons(built(ENGINE), {**current, field: value}) == [reason]


def test_onnx_is_reexported_when_weights_or_opset_change():
    manifest = {"precision": "fp32", "opset": 18, "weights_sha256": "a" * 64}
    assert onnx_action(manifest, dict(manifest)) == ("reuse", [])
    assert onnx_action(None, manifest)[0] == "export"
    assert onnx_action(manifest, {**manifest, "opset": 19}) == ("export", ["opset 18 -> 19"])


def test_weights_record_rehashes_only_when_a_file_changed(tiny_cascade, tmp_path):
    copy = tmp_path / "stage"
    shutil.copytree(tiny_cascade / "unet", copy / "unet")
    record = weights_record(copy)
    assert set(record["files"]) == {"unet/config.json", "unet/diffusion_pytorch_model.safetensors"}
    assert weights_record(copy, {**record, "sha256": "kept"})["sha256"] == "kept"  # same sizes and mtimes
    (copy / LORA_WEIGHTS).write_bytes(b"adapter")  # a LoRA run's adapter is part of the weights
    assert weights_files(copy)[-1] == copy / LORA_WEIGHTS
    assert weights_record(copy, {**record, "sha256": "kept"})["sha256"] not in ("kept", record["sha256"])


def test_corrupt_manifest_is_a_user_error(tmp_path):
    assert read_manifest(tmp_path / "none.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable export manifest"):
        read_manifest(tmp_path / "bad.json")


def test_batch_sizes_are_prompt_batches_doubled_for_guidance():
    prompt = parse_batch_sizes("1:4:8")
    assert prompt == BatchSizes(1, 4, 8) and str(prompt) == "1:4:8"
    assert unet_batch_sizes(prompt) == BatchSizes(1, 8, 16)
    assert parity_batch_sizes(unet_batch_sizes(parse_batch_sizes("2:2:2"))) == (2, 3)


@pytest.mark.parametrize("text", ["", "4", "1:2", "1:2:3:4", "a:b:c", "1.5:2:3", "0:1:2", "4:2:8", "1:8:4", "-1:1:1"])
def test_bad_batch_sizes_are_user_errors_naming_the_option(text):
    with pytest.raises(UserError, match="--batch-sizes"):
        parse_batch_sizes(text)


def test_presets_in_the_repository_are_valid_and_bad_ones_are_user_errors(tmp_path):
    presets = sorted(PRESETS.glob("*.json"))
    assert presets
    for preset in presets:
        parse_batch_sizes(load_preset(preset).get("batch_sizes", "1:1:1"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"batch_size": "1:1:1"}))
    with pytest.raises(UserError, match="unknown key 'batch_size'"):
        load_preset(bad)
    bad.write_text(json.dumps({"precision": "int8"}))
    with pytest.raises(UserError, match="precision must be one of"):
        load_preset(bad)


@no_tensorrt
def test_missing_tensorrt_is_one_line_naming_the_install_command(tiny_cascade, exported, tmp_path):
    assert "pip install tensorrt --extra-index-url https://pypi.nvidia.com" == INSTALL_COMMAND
    with pytest.raises(UserError, match="TensorRT is not installed.*pip install tensorrt --extra-index-url"):
        export_cascade(tiny_cascade, out_dir=tmp_path, trt=True)
    with pytest.raises(UserError, match="TensorRT is not installed"):
        make_unet_runner("trt", "base", exported)
    result = CliRunner().invoke(main, ["export", "--model", str(tiny_cascade), "--trt", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.startswith("error: TensorRT is not installed") and len(result.output.splitlines()) == 1
    assert INSTALL_COMMAND in result.output
    assert not any(tmp_path.iterdir())  # refused before any slow ONNX work


@pytest.mark.parametrize("args, message", [([], "--onnx and/or --trt"), (["--onnx", "--opset", "17"], "--opset 17"),
                                           (["--onnx", "--batch-sizes", "8:1:1"], "--batch-sizes")])
def test_cli_mistakes_exit_2_with_one_line(tiny_cascade, tmp_path, args, message):
    result = CliRunner().invoke(main, ["export", "--model", str(tiny_cascade), "--out", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
