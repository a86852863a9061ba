"""Runs the emulated CUDA kernels under AddressSanitizer: any read or write outside the
tensors they are given (features, labels, segments, saved state) or the outputs they fill
stops the run with ASan's report, which names the kernel line.

Start it with libasan preloaded, as tests/test_cuda_emulated.py does:
    LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \\
        python tests/cuda_emulation/asan_check.py
Prints one line per case and "all cases ran" at the end.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cuda_emulation import emulation  # noqa: E402
from supcon_cases import CASES, IGNORE, TEMPERATURE, make_inputs  # noqa: E402


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
    print("all cases ran")


if __name__ == "__main__":
    main()
