"""Builds dreambooth_fast with its native extension `dreambooth_fast._C`.

The CPU kernels (csrc/cpu) are always compiled; on x86-64 their inner loops are compiled a second time for
AVX2 (csrc/cpu/*_avx2.cpp, with -mavx2 -mfma -mf16c for those files only) and chosen at run time, as ATen
does. The CUDA kernels (csrc/cuda) join them when torch is a CUDA build and nvcc is found (CUDA_HOME).
Build against the torch you run with: `pip install --no-build-isolation -e .`
"""

import platform
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]
WITH_AVX2 = platform.machine().lower() in ("x86_64", "amd64")


def _relative(paths) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in paths)


def native_extension():
    cpu_sources = [p for p in CSRC.glob("cpu/*.cpp") if not p.stem.endswith("_avx2")]
    sources = _relative([CSRC / "ops.cpp", *cpu_sources])
    cuda_sources = _relative(CSRC.glob("cuda/*.cu"))
    with_cuda = bool(torch.version.cuda) and CUDA_HOME is not None and bool(cuda_sources)
    kwargs = {
        "include_dirs": [str(CSRC)],
        "define_macros": [("DBFAST_WITH_AVX2", None)] if WITH_AVX2 else [],
        "extra_compile_args": {"cxx": ["-O3", "-fopenmp"], "nvcc": ["-O3"]},
        "extra_link_args": ["-fopenmp"],
    }
    if with_cuda:
        return CUDAExtension("dreambooth_fast._C", sources + cuda_sources, **kwargs)
    return CppExtension("dreambooth_fast._C", sources, **kwargs)


class BuildWithAVX2(BuildExtension):
    """BuildExtension that first compiles the *_avx2.cpp sources with AVX2 flags and links their objects in."""

    def build_extension(self, ext) -> None:
        avx2_sources = _relative(CSRC.glob("cpu/*_avx2.cpp")) if WITH_AVX2 else []
        if avx2_sources:
            cflags = dict(ext.extra_compile_args)
            cflags["cxx"] = cflags["cxx"] + AVX2_FLAGS
            objects = self.compiler.compile(
                avx2_sources,
                output_dir=self.build_temp,
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs=cflags,
                depends=ext.depends,
            )
            ext.extra_objects = [*ext.extra_objects, *(o for o in objects if o not in ext.extra_objects)]
        super().build_extension(ext)


setup(ext_modules=[native_extension()], cmdclass={"build_ext": BuildWithAVX2})
