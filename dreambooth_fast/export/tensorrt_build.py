"""The thin TensorRT layer: import it (or say how to install it), describe the GPU, build and refit engines.

Written against TensorRT 10's Python API (`tensorrt.Builder`, `OnnxParser`, `Refitter`, `OnnxParserRefitter`).
Networks are strongly typed: the precision comes from the ONNX graph (an fp16 graph exported from the fp16
UNet, or the fp32 one), because TensorRT 10.12 deprecated and TensorRT 11 removed the FP16 builder flag.
TensorRT is imported only here and only when asked for; nothing else in the package needs it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import UserError
from ..fileio import atomic_write

INSTALL_COMMAND = "pip install tensorrt --extra-index-url https://pypi.nvidia.com"
MIN_MAJOR_VERSION = 10


def engine_file_name(precision: str) -> str:
    return f"unet.{precision}.engine"


def import_tensorrt():
    """The tensorrt module, or a UserError naming the install command when it is missing or too old."""
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(
            f"TensorRT is not installed; on a machine with an NVIDIA GPU install it with `{INSTALL_COMMAND}` "
            "(or use --onnx / --backend onnx, which need no GPU)"
        ) from None
    if int(trt.__version__.split(".")[0]) < MIN_MAJOR_VERSION:
        raise UserError(f"TensorRT {trt.__version__} is too old; need {MIN_MAJOR_VERSION} or later: "
                        f"`{INSTALL_COMMAND} --upgrade`")
    return trt


def tensorrt_environment(trt) -> dict[str, str]:
    """What an engine is tied to: TensorRT version, GPU name and compute capability (of the current device)."""
    if not torch.cuda.is_available():
        raise UserError("TensorRT needs a CUDA GPU visible to PyTorch (torch.cuda.is_available() is False); "
                        "install a CUDA build of torch, or use --backend onnx")
    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt_version": trt.__version__, "gpu_name": torch.cuda.get_device_name(),
            "compute_capability": f"{major}.{minor}"}


def _write_atomic(path: Path, data) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(memoryview(data)))  # data: TensorRT's IHostMemory


def build_engine(trt, onnx_path: Path, engine_path: Path, *, shapes: dict[str, tuple[tuple[int, ...], ...]],
                 precision: str, timing_cache: Path, refittable: bool = False,
                 log: Callable[[str], None] = print) -> None:
    """Build a serialized engine from `onnx_path` into `engine_path`, one optimisation profile with `shapes`
    {input name: (min shape, opt shape, max shape)}. The timing cache file is read when it matches this GPU
    and TensorRT version, and written back with what this build measured."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"{onnx_path}: TensorRT {trt.__version__} cannot parse it ({errors}); try a newer TensorRT")
    config = builder.create_builder_config()
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means full float32 matmuls and convolutions
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    attach_timing_cache(config, timing_cache, log)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"{onnx_path}: TensorRT failed to build an engine (see its log above)")
    _write_atomic(engine_path, plan)
    _write_atomic(timing_cache, config.get_timing_cache().serialize())


def attach_timing_cache(config, path: Path, log: Callable[[str], None] = print) -> None:
    """Give the builder config the timing cache stored at `path`, or a new empty one when there is none, when
    TensorRT cannot read it (`create_timing_cache` returns None for a corrupt or truncated file, or one written by
    another TensorRT version: a warning), or when it was measured on another GPU or TensorRT version."""
    cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
    if cache is None:
        warnings.warn(f"{path}: TensorRT cannot read this timing cache (corrupt, or written by another TensorRT "
                      "version); starting a new one, which this build will write there", RuntimeWarning, stacklevel=2)
        cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log(f"{path}: made by another GPU or TensorRT version; starting a new timing cache")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def refit_engine(trt, engine_path: Path, onnx_path: Path) -> bool:
    """Load new weights from `onnx_path` into the refittable engine at `engine_path`, in place. False when
    TensorRT cannot refit it (the caller rebuilds)."""
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)  # kept in a variable: the runtime must outlive the engine it deserializes
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        return False
    refitter = trt.Refitter(engine, logger)
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not parser_refitter.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
        return False
    _write_atomic(engine_path, engine.serialize())
    return True
