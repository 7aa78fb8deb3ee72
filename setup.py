"""Builds the native allreduce extension (ddl_worker._native) next to the Python packages.

The CPU part (schedule, c10d/Gloo transport, host kernels) always builds. The CUDA kernels and
the NCCL transport build where a CUDA toolkit (nvcc) and NCCL headers are found;
DDL_NATIVE_CUDA=0 turns them off, DDL_NATIVE_CUDA=1 makes their absence an error. NCCL is
looked up in $NCCL_HOME, then torch's nvidia-nccl wheel, then the CUDA toolkit.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent
NATIVE = ROOT / "native"
CORE_SOURCES = ["grid.cpp", "plan.cpp", "schedule.cpp", "stats.cpp", "transport.cpp"]
TORCH_SOURCES = [
    "adapter.cpp",
    "kernels_cpu.cpp",
    "c10d_transport.cpp",
    "shm_tier.cpp",
    "communicator.cpp",
    "ops.cpp",
]
CUDA_SOURCES = ["kernels.cu", "nccl_communicator.cpp"]


def _relative(paths: list[Path]) -> list[str]:
    # setuptools wants paths relative to the project root.
    return [str(p.relative_to(ROOT)) for p in paths]


def _nccl_home() -> Path | None:
    candidates: list[Path] = []
    if os.environ.get("NCCL_HOME"):
        candidates.append(Path(os.environ["NCCL_HOME"]))
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "nccl" for p in spec.submodule_search_locations]
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME:
        candidates.append(Path(CUDA_HOME))
    candidates += [Path("/usr"), Path("/usr/local")]
    for home in candidates:
        if (home / "include" / "nccl.h").is_file():
            return home
    return None


def _nccl_library_dir(home: Path) -> Path | None:
    for sub in ("lib", "lib64", "lib/x86_64-linux-gnu", "lib/aarch64-linux-gnu"):
        d = home / sub
        if any(d.glob("libnccl.so*")):
            return d
    return None


def _want_cuda() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    setting = os.environ.get("DDL_NATIVE_CUDA", "auto").lower()
    if setting in ("0", "false", "no", "off"):
        return False
    found = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and (Path(CUDA_HOME) / "bin" / "nvcc").exists()
    )
    if setting in ("1", "true", "yes", "on") and not found:
        sys.exit(
            "DDL_NATIVE_CUDA=1 but no CUDA build is possible: torch.version.cuda="
            f"{torch.version.cuda}, CUDA_HOME={CUDA_HOME} (set CUDA_HOME to a toolkit with nvcc)"
        )
    return found


def _extensions() -> tuple[list[object], dict[str, object]]:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        sys.exit(
            "building ddl-operator needs torch importable at build time: "
            "pip install torch, then pip install --no-build-isolation -e ."
        )

    include_dirs = [str(NATIVE / "core"), str(NATIVE / "torch")]
    sources = [NATIVE / "core" / s for s in CORE_SOURCES] + [
        NATIVE / "torch" / s for s in TORCH_SOURCES
    ]
    cxx_flags = ["-O2", "-std=c++17", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    if not _want_cuda():
        extension = CppExtension(  # type: ignore[no-untyped-call]
            "ddl_worker._native",
            _relative(sources),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
        )
        return [extension], {"build_ext": BuildExtension}

    home = _nccl_home()
    libdir = _nccl_library_dir(home) if home else None
    if home is None or libdir is None:
        sys.exit(
            "CUDA build requested but NCCL was not found (nccl.h and libnccl.so); set NCCL_HOME, "
            "install nvidia-nccl-cu13, or build the CPU part alone with DDL_NATIVE_CUDA=0"
        )
    libraries = [f":{p.name}" for p in sorted(libdir.glob("libnccl.so*"))[:1]]
    extension = CUDAExtension(  # type: ignore[no-untyped-call]
        "ddl_worker._native",
        _relative(sources + [NATIVE / "cuda" / s for s in CUDA_SOURCES]),
        include_dirs=[*include_dirs, str(home / "include")],
        library_dirs=[str(libdir)],
        libraries=libraries,
        runtime_library_dirs=[str(libdir)],
        define_macros=[("DDL_WITH_CUDA", "1")],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-std=c++17", "-lineinfo"],
        },
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
