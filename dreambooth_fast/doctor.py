"""`dbfast doctor`: what this installation can do, in a few lines."""

from __future__ import annotations

import importlib.util
import platform
import shutil

import torch

from . import __version__


def _package_version(name: str) -> str:
    if importlib.util.find_spec(name) is None:
        return "not installed"
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "installed"


def distributed_line() -> str:
    """The launcher's view of this process (under torchrun / accelerate launch), or which backends a launch gets."""
    import torch.distributed as dist

    from .distributed import launched_rank, launched_world_size

    if not dist.is_available():
        return "not available in this torch build"
    backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    world_size = launched_world_size()
    if world_size > 1:
        return f"launched: rank {launched_rank()} of {world_size}, backend {backend}"
    backends = ", ".join(name for name, ok in (("gloo", dist.is_gloo_available()), ("nccl", dist.is_nccl_available()))
                         if ok)
    return f"not launched ({backends} available): torchrun --nproc_per_node N -m dreambooth_fast train ..."


def report(disk_path: str = ".") -> str:
    from .ops import native_cpu_kernels, native_status

    native = native_status()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86-64'})"
    cpu_ops = f"built ({native_cpu_kernels()} kernels)" if native["cpu"] else "NOT built: using the PyTorch reference"
    free_gib = shutil.disk_usage(disk_path).free / 2**30
    tensorrt = _package_version("tensorrt")
    lines = [
        f"dreambooth-fast {__version__}",
        f"python          {platform.python_version()}",
        f"torch           {torch.__version__} (cuda {torch.version.cuda or 'none'})",
        f"device          {device}",
        f"native ops cpu  {cpu_ops}",
        f"native ops cuda {'built' if native['cuda'] else 'not built'}",
        f"diffusers       {_package_version('diffusers')}",
        f"transformers    {_package_version('transformers')}",
        f"onnxruntime     {_package_version('onnxruntime')}",
        f"tensorrt        {tensorrt}",
        f"distributed     {distributed_line()}",
        f"free disk       {free_gib:.1f} GiB at {disk_path}",
    ]
    return "\n".join(lines)
