"""One small forward and backward of the fused op per multiply path, for compute-sanitizer.

A pytest session under compute-sanitizer spends minutes in torch's import and collection; this
runs just the kernels (about ten launches) on a varlen batch with empty, one-row and partial
segments and ignored rows, checks the results against the float64 reference, and prints OK.

    compute-sanitizer --tool racecheck python tests/sanitizer_case.py
    python tests/sanitizer_case.py --device cpu      # the same on the CPU op (float32/float64)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from supcon_cases import CASES, IGNORE, TEMPERATURE, make_inputs, reference_loss_and_grad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    device = parser.parse_args().device

    features, labels, offsets = make_inputs(*CASES["varlen-empty-segments"], dtype=torch.float64)
    upstream = torch.rand(
        features.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    reference, _, reference_grad = reference_loss_and_grad(
        features, labels, offsets, True, upstream
    )

    # (dtype, TF32 on, tolerance relative to the largest reference value, MCSC_CUDA_KERNELS)
    paths = [(torch.float64, False, 1e-9, "wmma"), (torch.float32, False, 1e-4, "wmma")]
    if device == "cuda":
        paths += [
            (torch.float32, True, 2e-2, "wmma"),
            (torch.float16, False, 3e-2, "wmma"),
            (torch.bfloat16, False, 1e-1, "wmma"),
            (torch.float32, False, 1e-4, "mma"),
            (torch.float32, True, 2e-2, "mma"),
            (torch.float16, False, 3e-2, "mma"),
            (torch.bfloat16, False, 1e-1, "mma"),
        ]
    scale = max(1.0, float(reference.abs().max()), float(reference_grad.abs().max()))
    failures = 0
    for dtype, tf32, tolerance, kernels in paths:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        os.environ["MCSC_CUDA_KERNELS"] = kernels
        inputs = features.to(device, dtype, copy=True).requires_grad_(True)
        loss, _, _, _ = torch.ops.mcsc.supcon_forward(
            inputs, labels.to(device), offsets.to(device), TEMPERATURE, True, IGNORE
        )
        (loss * upstream.to(device, dtype)).sum().backward()
        loss_error = float((loss.detach().double().cpu() - reference).abs().max())
        grad_error = float((inputs.grad.double().cpu() - reference_grad).abs().max())
        ok = max(loss_error, grad_error) <= tolerance * scale
        failures += not ok
        print(
            f"{dtype} tf32={tf32} {kernels}: loss error {loss_error:.2e}, grad error {grad_error:.2e} "
            f"{'ok' if ok else 'TOO LARGE'}"
        )
    torch.backends.cuda.matmul.allow_tf32 = False
    print("OK" if failures == 0 else f"{failures} paths failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
