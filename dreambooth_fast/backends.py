"""UNet backends for sampling: eager torch, torch.compile, ONNX Runtime, TensorRT. One list for the CLI,
`dbfast generate`, `dbfast eval` and the benchmarks, and the function that turns a stage into a runner."""

from __future__ import annotations

from pathlib import Path

BACKENDS = ("torch", "compile", "onnx", "trt")
TORCH_BACKENDS = ("torch", "compile")  # run the torch UNets; the others run exported files


def unet_runner(backend: str, unet, stage_dir: Path, export_dir: Path, stage: str, device):
    """The UNet as a `unet_fn` for the sampler: eager, torch.compile'd, ONNX Runtime or TensorRT."""
    import torch

    from .sample import torch_unet_fn

    if backend == "torch":
        return torch_unet_fn(unet)
    if backend == "compile":
        return torch_unet_fn(torch.compile(unet))
    from .export import make_unet_runner

    return make_unet_runner(backend, stage, export_dir, stage_dir=stage_dir, device=device.type)
