"""Runs the emulated CUDA kernels under AddressSanitizer: any read or write outside the
tensors they are given (features, labels, segments, saved state) or the outputs they fill
stops the run with ASan's report, which names the kernel line.

Start it with libasan preloaded, as tests/test_cuda_emulated.py does:
    LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \\
        python tests/cuda_emulation/asan_check.py
Runs every single-set case on every multiply path, and the reference-set cases (also with self
indices and labels the Python checks reject): the varlen one on every path, the others on one
path per kernel family and multiply. Prints one line per case and "all cases ran" at
the end.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cuda_emulation import emulation  # noqa: E402
from cuda_emulation.reference_sets import run_reference_set  # noqa: E402
from supcon_cases import (  # noqa: E402
    CASES,
    IGNORE,
    KERNEL_REFERENCE_CASES,
    TEMPERATURE,
    make_inputs,
    make_reference_inputs,
)

# Paths that run every reference-set case under the sanitizer: FMA, WMMA and mma.sync.
REFERENCE_ASAN_PATHS = ("float32-fma", "bfloat16-wmma", "float32-tf32-mma", "float16-mma")


def unchecked(inputs):
    """The inputs with values the Python checks reject and compiled calls poison, which the
    kernels must still read safely: self indices past K, far past int32, negative, of another
    segment or label; labels that are negative or huge on either side."""
    k = inputs.ref_features.shape[0]
    m = inputs.features.shape[0]
    self_index = torch.full((m,), -1, dtype=torch.int64)
    if inputs.ref_self_index is not None:
        self_index = inputs.ref_self_index.clone()
    bad = [k, k + 5, 1 << 40, -7, -(1 << 40), 0, k - 1]
    self_index[: len(bad)] = torch.tensor(bad[:m])
    labels = inputs.labels.clone()
    labels[1::7] = -5
    ref_labels = inputs.ref_labels.clone()
    ref_labels[2::5] = 1 << 50
    return inputs._replace(labels=labels, ref_labels=ref_labels, ref_self_index=self_index)


def main() -> None:
    kernels = emulation.load(address_sanitizer=True)
    kernels.poison_shared_memory()
    for name, case in CASES.items():
        for path in emulation.PATHS.values():
            features, labels, offsets = make_inputs(*case, dtype=path.dtype)
            _, lse, positives, _ = emulation.forward(
                kernels, path, features, labels, offsets, TEMPERATURE, True, IGNORE
            )
            upstream = torch.rand(features.shape[0])
            emulation.backward(
                kernels,
                path,
                upstream,
                features,
                labels,
                offsets,
                lse,
                positives,
                TEMPERATURE,
                True,
            )
        print(f"{name}: ok", flush=True)
    # The reference set: its varlen case on every path, with and without unchecked values;
    # the larger cases on one path per kernel family and multiply (they add reads past no new
    # boundary the varlen case leaves out, only more of them).
    for name, case in KERNEL_REFERENCE_CASES.items():
        paths = emulation.PATHS if name == "varlen" else REFERENCE_ASAN_PATHS
        for path_name in paths:
            path = emulation.PATHS[path_name]
            inputs = make_reference_inputs(**case, dtype=path.dtype)
            for checked_or_not in (inputs, unchecked(inputs)):
                upstream = torch.rand(inputs.features.shape[0])
                run_reference_set(kernels, checked_or_not, True, upstream, path, False)
        print(f"reference set {name}: ok", flush=True)
    print("all cases ran")


if __name__ == "__main__":
    main()
