"""`dbfast export`: each UNet of a cascade to ONNX (checked and parity-tested) and, on request, TensorRT engines.

Output layout (default MODEL/export):
  base/unet.fp32.onnx          [+ unet.fp32.onnx.data past 2 GiB]  and  unet.fp32.onnx.json (manifest)
  base/unet.fp16.onnx          exported from the fp16 UNet; TensorRT builds its fp16 engine from it
  base/unet.fp16.engine        and  unet.fp16.engine.json (manifest with the cache key)
  sr/...                       the same for stage II (IF) or the x4 upscaler (Stable Diffusion)
  timing.cache                 TensorRT's timing cache, shared by the stages
ONNX precisions written: fp32 with --onnx (runs anywhere; the onnx backend's default) and the engine precision
with --trt (fp16 unless --precision says otherwise); --onnx --precision fp16 writes both. Anything already
exported from the same weights with the same settings is kept, not redone.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from .. import __version__, sd_upscale
from ..errors import UserError
from ..models import load_unet, model_family
from .manifest import (
    engine_action,
    engine_cache_key,
    manifest_path,
    onnx_action,
    read_manifest,
    sha256_files,
    weights_record,
    write_manifest,
)
from .onnx_export import (
    DEFAULT_OPSET,
    EXTERNAL_DATA_THRESHOLD,
    OUTPUT_NAME,
    UNetGraph,
    UNetSpec,
    cascade_stages,
    export_unet_onnx,
    onnx_file_name,
    require_onnx,
    stage_text_length,
    unet_spec,
)
from .parity import TOLERANCES, ParityResult, check_engine_parity, check_parity, reference_cases
from .profiles import (
    DEFAULT_BATCH_SIZES,
    PRECISIONS,
    BatchSizes,
    parity_batch_sizes,
    parse_batch_sizes,
    profile_shapes,
    unet_batch_sizes,
)
from .runners import OnnxRunner, TensorRTRunner
from .tensorrt_build import build_engine, engine_file_name, import_tensorrt, refit_engine, tensorrt_environment

Log = Callable[[str], None]


def default_export_dir(model_dir: str | Path) -> Path:
    return Path(model_dir) / "export"


def onnx_precisions(onnx: bool, trt: bool, precision: str | None) -> list[str]:
    """The ONNX precisions an export writes, fp32 first (the fp16 export converts the loaded UNet in place)."""
    wanted = {"fp32"} if onnx else set()
    if trt or precision:
        wanted.add(precision or "fp16")
    return [p for p in ("fp32", "fp16") if p in wanted]


def export_cascade(model_dir: str | Path, *, sr_model_dir: str | Path | None = None, out_dir: str | Path | None = None,
                   onnx: bool = True, trt: bool = False, precision: str | None = None,
                   batch_sizes: str = DEFAULT_BATCH_SIZES, opset: int = DEFAULT_OPSET, refit: bool = False,
                   external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, log: Log = print) -> dict[str, dict]:
    """Export every UNet of the cascade at `model_dir`; return {stage: {"onnx": {precision: manifest},
    "engine": manifest or None}}. `batch_sizes` is the prompt batch profile MIN:OPT:MAX (see profiles.py)."""
    if not (onnx or trt):
        raise UserError("dbfast export: say what to export: --onnx and/or --trt")
    if precision not in (None, *PRECISIONS):
        raise UserError(f"--precision {precision}: choose fp16 or fp32")
    if opset < DEFAULT_OPSET:
        raise UserError(f"--opset {opset}: need {DEFAULT_OPSET} or later")
    prompt_batches = parse_batch_sizes(batch_sizes)
    require_onnx()
    stages = cascade_stages(model_dir, sr_model_dir)
    trt_module = import_tensorrt() if trt else None  # fail before the slow ONNX export, not after it
    engine_fields = None
    if trt:
        engine_fields = {**tensorrt_environment(trt_module), "precision": precision or "fp16",
                         "profile": unet_batch_sizes(prompt_batches).as_dict(), "opset": opset, "refittable": refit}
    out_dir = Path(out_dir) if out_dir is not None else default_export_dir(model_dir)
    summary = {}
    for stage, stage_dir in stages:
        engine = trt
        if trt and stage == "sr" and model_family(stage_dir) == "sd":
            log(f"sr: {sd_upscale.NO_TENSORRT}: not built; the onnx backend runs it (--onnx)")
            engine = False
            if not onnx:
                continue
        stage_out = out_dir / stage
        stage_out.mkdir(parents=True, exist_ok=True)
        summary[stage] = _export_stage(
            stage, stage_dir, stage_out, precisions=onnx_precisions(onnx, engine, precision), opset=opset,
            external_data_threshold=external_data_threshold, unet_batches=unet_batch_sizes(prompt_batches),
            trt=trt_module if engine else None, engine_fields=engine_fields if engine else None,
            timing_cache=out_dir / "timing.cache", log=log,
        )
    return summary


def _existing(path: Path) -> dict | None:
    return read_manifest(manifest_path(path)) if path.is_file() else None


def _export_stage(stage: str, stage_dir: Path, stage_out: Path, *, precisions: list[str], opset: int,
                  external_data_threshold: int, unet_batches: BatchSizes, trt, engine_fields: dict | None,
                  timing_cache: Path, log: Log) -> dict:
    onnx_paths = {p: stage_out / onnx_file_name(p) for p in precisions}
    onnx_manifests = {p: _existing(path) for p, path in onnx_paths.items()}
    previous = next((m["weights"] for m in onnx_manifests.values() if m), None)
    weights = weights_record(stage_dir, previous)
    todo = []
    for p, path in onnx_paths.items():
        action, reasons = onnx_action(onnx_manifests[p], {"precision": p, "opset": opset,
                                                          "weights_sha256": weights["sha256"]})
        if action == "reuse":
            log(f"{stage}: {path} is up to date (same weights, precision and opset); kept")
        else:
            log(f"{stage}: exporting {path} ({'; '.join(reasons)})")
            todo.append(p)
    engine_path, engine_plan = None, ("reuse", [])
    if engine_fields is not None:
        engine_fields = {**engine_fields, "weights_sha256": weights["sha256"]}
        engine_path = stage_out / engine_file_name(engine_fields["precision"])
        engine_plan = engine_action(_existing(engine_path), engine_fields)
        if engine_plan[0] == "reuse":
            log(f"{stage}: {engine_path} is up to date (cache key {engine_cache_key(engine_fields)}); kept")
    if not todo and engine_plan[0] == "reuse":
        return {"onnx": onnx_manifests, "engine": _existing(engine_path) if engine_path else None}

    unet = load_unet(stage_dir).eval()
    spec = unet_spec(unet, stage_text_length(stage_dir))
    cases = reference_cases(UNetGraph(unet), spec, parity_batch_sizes(unet_batches))
    for p in todo:
        if p == "fp16":
            unet.half()  # in place: no second copy of a multi-GB UNet; fp32 (when wanted) was exported before
        onnx_manifests[p] = _export_onnx(unet, spec, stage, stage_dir, onnx_paths[p], p, cases, weights, opset,
                                         external_data_threshold, log)
    engine_manifest = _existing(engine_path) if engine_path else None
    if engine_plan[0] != "reuse":
        onnx_path = onnx_paths[engine_fields["precision"]]
        engine_manifest = _build_engine(stage, spec, engine_path, onnx_path, onnx_manifests, engine_fields,
                                        engine_plan, unet_batches, cases, weights, trt, timing_cache, log)
    return {"onnx": onnx_manifests, "engine": engine_manifest}


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"dbfast": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def _input_shapes(spec: UNetSpec) -> dict[str, list]:
    shapes = {name: ["batch", *shape[1:]] for name, shape in spec.shapes(1).items()}
    if spec.size_multiple:  # the x4 upscaler: images of any size
        shapes["sample"][2:] = ["side", "side"]
    return shapes


def _log_parity(log: Log, stage: str, what: str, results: list[ParityResult]) -> None:
    log(f"{stage}: {what} parity vs PyTorch fp32: " + "; ".join(map(str, results)))


def _export_onnx(unet, spec: UNetSpec, stage: str, stage_dir: Path, path: Path, precision: str, cases,
                 weights: dict, opset: int, external_data_threshold: int, log: Log) -> dict:
    """Export `unet` (already in `precision`) into a temp folder beside `path`, check and parity-test it there,
    then move the files into place and write the manifest last."""
    tolerance = TOLERANCES[precision]
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        files = export_unet_onnx(unet, spec, Path(tmp) / path.name, opset=opset,
                                 external_data_threshold=external_data_threshold)
        results = check_parity(cases, OnnxRunner(files[0]), tolerance, f"{stage} {precision} ONNX export of {path}")
        _log_parity(log, stage, f"ONNX {precision} (ONNX Runtime, CPU)", results)
        manifest = {
            "kind": "onnx", "stage": stage, "family": model_family(stage_dir), "source": str(stage_dir.resolve()),
            "file": path.name, "files": [f.name for f in files], "external_data": len(files) > 1,
            "onnx_sha256": sha256_files(files),
            "precision": precision, "opset": opset, "weights": weights, "weights_sha256": weights["sha256"],
            "inputs": _input_shapes(spec), "output": OUTPUT_NAME,
            "parity": [r.as_dict() for r in results], "tolerance": asdict(tolerance),
            "versions": _versions(),
        }
        manifest_path(path).unlink(missing_ok=True)
        path.with_name(path.name + ".data").unlink(missing_ok=True)
        for f in files:
            os.replace(f, path.with_name(f.name))
    write_manifest(manifest_path(path), manifest)
    return manifest


def _build_engine(stage: str, spec: UNetSpec, engine_path: Path, onnx_path: Path, onnx_manifests: dict,
                  fields: dict, plan: tuple[str, list[str]], unet_batches: BatchSizes, cases, weights: dict, trt,
                  timing_cache: Path, log: Log) -> dict:
    """Refit or build the engine, parity-test it, write its manifest; an engine failing parity is deleted."""
    action, reasons = plan
    onnx_manifest = onnx_manifests[fields["precision"]]
    manifest_path(engine_path).unlink(missing_ok=True)
    if action == "refit":
        log(f"{stage}: refitting {engine_path} with new weights ({'; '.join(reasons)})")
        if not refit_engine(trt, engine_path, onnx_path):
            log(f"{stage}: TensorRT could not refit {engine_path}; rebuilding it")
            action = "build"
    if action == "build":
        log(f"{stage}: building {engine_path} ({'; '.join(reasons)}); this takes minutes")
        build_engine(trt, onnx_path, engine_path, shapes=profile_shapes(spec, unet_batches),
                     precision=fields["precision"], timing_cache=timing_cache, refittable=fields["refittable"], log=log)
    try:
        results, graph_results = check_engine_parity(
            cases, lambda cuda_graphs: TensorRTRunner(engine_path, cuda_graphs=cuda_graphs),
            TOLERANCES[fields["precision"]], f"{stage} TensorRT engine {engine_path}")
    except UserError:
        engine_path.unlink(missing_ok=True)
        raise
    _log_parity(log, stage, f"TensorRT {fields['precision']}", results)
    log(f"{stage}: TensorRT CUDA graph replay vs plain launches: " + "; ".join(map(str, graph_results)))
    manifest = {
        **fields, "kind": "tensorrt-engine", "stage": stage, "family": onnx_manifest.get("family", "if"),
        "source": onnx_manifest["source"],
        "file": engine_path.name, "onnx": onnx_path.name, "onnx_sha256": onnx_manifest["onnx_sha256"],
        "weights": weights, "cache_key": engine_cache_key(fields), "inputs": _input_shapes(spec), "output": OUTPUT_NAME,
        "parity": [r.as_dict() for r in results], "graph_parity": [r.as_dict() for r in graph_results],
        "versions": {"dbfast": __version__, "torch": torch.__version__},
    }
    write_manifest(manifest_path(engine_path), manifest)
    return manifest
