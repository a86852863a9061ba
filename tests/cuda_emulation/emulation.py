"""Builds the CPU emulation of mcsc's CUDA kernels (emulated_kernels.cpp) as a Python module."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils import cpp_extension

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


class MultiplyPath(NamedTuple):
    """What picks one multiply path of the kernels: the features dtype, whether float32 may
    use TF32, and the MCSC_CUDA_KERNELS family ("wmma" or "mma"; float64 is the same in both)."""

    dtype: torch.dtype
    allow_tf32: bool
    kernels: str = "wmma"


# The kernels' multiply paths, named.
PATHS = {
    "float64-fma": MultiplyPath(torch.float64, False),
    "float32-fma": MultiplyPath(torch.float32, False),
    "float32-tf32": MultiplyPath(torch.float32, True),
    "float16-wmma": MultiplyPath(torch.float16, False),
    "bfloat16-wmma": MultiplyPath(torch.bfloat16, False),
    "float32-fma-mma": MultiplyPath(torch.float32, False, "mma"),
    "float32-tf32-mma": MultiplyPath(torch.float32, True, "mma"),
    "float16-mma": MultiplyPath(torch.float16, False, "mma"),
    "bfloat16-mma": MultiplyPath(torch.bfloat16, False, "mma"),
}


def forward(
    module,
    path: MultiplyPath,
    features,
    labels,
    offsets,
    temperature,
    prevalence,
    ignore_index,
    descending=False,
    **options,
):
    """The emulated forward (module: load()'s) on one multiply path: (loss, lse, positives,
    anchor_grad), as mcsc::supcon_forward returns them. ``options``: multiprocessors, and the
    op's reference-set arguments (ref_features, ref_labels, ref_segments, ref_self_index,
    anchor_gradient)."""
    return module.forward(
        features,
        labels,
        offsets,
        temperature,
        prevalence,
        ignore_index,
        path.allow_tf32,
        descending,
        kernels=path.kernels,
        **options,
    )


def backward(
    module,
    path: MultiplyPath,
    grad_loss,
    features,
    labels,
    offsets,
    lse,
    positives,
    temperature,
    prevalence,
    descending=False,
    ignore_index=-1,
    **reference,
):
    """The emulated backward on one multiply path: the gradient with respect to features, or
    with the reference-set arguments (``reference``: ref_features, ref_labels, ref_segments,
    ref_self_index) with respect to ref_features."""
    return module.backward(
        grad_loss,
        features,
        labels,
        offsets,
        lse,
        positives,
        temperature,
        prevalence,
        ignore_index,
        path.allow_tf32,
        descending,
        kernels=path.kernels,
        **reference,
    )


def cuda_header_dirs() -> list[str]:
    """A directory with cuda_fp16.h: the toolkit's, or that of torch's nvidia wheels."""
    site = Path(torch.__file__).resolve().parent.parent
    candidates = [
        os.path.join(home, "include")
        for home in (os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda")
        if home
    ]
    candidates += sorted(glob.glob(str(site / "nvidia" / "cu*" / "include")))
    return [d for d in candidates if os.path.exists(os.path.join(d, "cuda_fp16.h"))][:1]


def load(address_sanitizer: bool = False):
    """Compile (or reuse) and import the emulation module.

    With ``address_sanitizer`` the module is built with -fsanitize=address; it can only be
    imported by a process started with libasan preloaded (see asan_check.py).
    """
    return _build("mcsc_cuda_emulation", "emulated_kernels.cpp", address_sanitizer)


def load_instructions(address_sanitizer: bool = False):
    """Compile (or reuse) and import the module of single-instruction test kernels
    (instruction_kernels.cpp: mma, ldmatrix, cp.async, cvt to TF32, and their misuses)."""
    return _build("mcsc_cuda_instructions", "instruction_kernels.cpp", address_sanitizer)


def _build(name: str, source: str, address_sanitizer: bool):
    headers = cuda_header_dirs()
    if not headers:
        raise FileNotFoundError(
            "cuda_fp16.h not found: install the CUDA toolkit or a CUDA "
            "build of torch (its nvidia wheels carry the headers)"
        )
    name += "_asan" if address_sanitizer else ""
    # Built in this checkout's build/ (ignored by git), so that two checkouts do not keep
    # rebuilding one shared cache entry; ninja rebuilds it when a source or header changes.
    build_directory = ROOT / "build" / name
    build_directory.mkdir(parents=True, exist_ok=True)
    asan = ["-fsanitize=address"]
    return cpp_extension.load(
        name=name,
        sources=[str(HERE / source)],
        extra_include_paths=[str(HERE / "include"), str(ROOT / "csrc"), *headers],
        extra_cflags=(
            [*asan, "-O1", "-g", "-fno-omit-frame-pointer"] if address_sanitizer else ["-O2"]
        ),
        extra_ldflags=asan if address_sanitizer else [],
        build_directory=str(build_directory),
    )
