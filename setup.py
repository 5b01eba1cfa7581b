"""Builds memstate and its native extension memstate._C.

Install torch first and build without isolation, so the extension is built against the torch
you run:  pip install --no-build-isolation -e .

CUDA kernels are built when torch has CUDA and CUDA_HOME (or nvcc) is found, or when
MEMSTATE_FORCE_CUDA=1; MEMSTATE_NO_CUDA=1 skips them. Reproducibility flags: host
-O3 -ffp-contract=off -fno-math-errno (never -ffast-math); nvcc --fmad=false (never
--use_fast_math).
"""
import glob
import importlib.util
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


VERSION = _load("_memstate_version", "memstate/_version.py").__version__
SOURCE_HASH = _load("_memstate_build_hash", "memstate/_build_hash.py").source_hash(
    os.path.join(HERE, "csrc")
)


def _want_cuda(torch, cpp_extension):
    if os.environ.get("MEMSTATE_NO_CUDA") == "1":
        return False
    if os.environ.get("MEMSTATE_FORCE_CUDA") == "1":
        return True
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extensions():
    import torch
    from torch.utils import cpp_extension

    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = ["csrc/ops.cpp"] + rel("csrc/cpu/*.cpp")
    defines = [f'-DMEMSTATE_VERSION="{VERSION}"', f'-DMEMSTATE_SOURCE_HASH="{SOURCE_HASH}"']
    # -fopenmp: at::parallel_for is header code that runs serially unless OpenMP is on.
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-fast-math"] + defines
    include_dirs = [os.path.join(HERE, "csrc", "include"), os.path.join(HERE, "csrc")]
    if _want_cuda(torch, cpp_extension):
        sources += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
        nvcc = ["-O3", "-std=c++17", "--fmad=false", "-lineinfo"] + defines + ["-DMEMSTATE_WITH_CUDA"]
        return [
            cpp_extension.CUDAExtension(
                "memstate._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx + ["-DMEMSTATE_WITH_CUDA"], "nvcc": nvcc},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        cpp_extension.CppExtension(
            "memstate._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]


def cmdclass():
    from torch.utils import cpp_extension

    return {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


setup(
    packages=find_packages(include=["memstate", "memstate.*"]),
    ext_modules=extensions(),
    cmdclass=cmdclass(),
    include_package_data=False,
    zip_safe=False,
)
