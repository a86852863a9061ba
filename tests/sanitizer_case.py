"""One small forward and backward of the fused op per multiply path, for compute-sanitizer.

A pytest session under compute-sanitizer spends minutes in torch's import and collection; this
runs just the kernels (about ten launches per path) on a varlen batch with empty, one-row and
partial segments and ignored rows, then on a reference set of such segments with self pairs
(anchors' and keys' gradients), checks the results against the float64 reference, and prints
OK.

    compute-sanitizer --tool racecheck python tests/sanitizer_case.py
    python tests/sanitizer_case.py --device cpu      # the same on the CPU op (float32/float64)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from supcon_cases import (
    CASES,
    IGNORE,
    REFERENCE_CASES,
    TEMPERATURE,
    make_inputs,
    make_reference_inputs,
    reference_loss_and_grad,
    reference_set_loss_and_grads,
)


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
    failures += reference_set_failures(device, paths)
    print("OK" if failures == 0 else f"{failures} paths failed")
    return 1 if failures else 0


def reference_set_failures(device, paths) -> int:
    """The reference-set forward (with the anchors' gradient) and backward (the keys' gradient)
    of every path against the float64 reference; returns the number of paths off."""
    inputs = make_reference_inputs(**REFERENCE_CASES["varlen-self"], dtype=torch.float64)
    upstream = torch.rand(
        inputs.features.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    reference, _, reference_features, reference_keys = reference_set_loss_and_grads(
        inputs, True, upstream
    )
    scale = max(
        1.0,
        *(float(value.abs().max()) for value in (reference, reference_features, reference_keys)),
    )
    failures = 0
    for dtype, tf32, tolerance, kernels in paths:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        os.environ["MCSC_CUDA_KERNELS"] = kernels
        features = inputs.features.to(device, dtype, copy=True).requires_grad_(True)
        keys = inputs.ref_features.to(device, dtype, copy=True).requires_grad_(True)
        loss, _, _, _ = torch.ops.mcsc.supcon_forward(
            features,
            inputs.labels.to(device),
            inputs.offsets.to(device),
            TEMPERATURE,
            True,
            IGNORE,
            keys,
            *(value.to(device) for value in inputs[4:]),
            anchor_gradient=True,
        )
        (loss * upstream.to(device, dtype)).sum().backward()
        errors = [
            float((value.detach().double().cpu() - expected).abs().max())
            for value, expected in (
                (loss, reference),
                (features.grad, reference_features),
                (keys.grad, reference_keys),
            )
        ]
        ok = max(errors) <= tolerance * scale
        failures += not ok
        print(
            f"reference set {dtype} tf32={tf32} {kernels}: loss error {errors[0]:.2e}, "
            f"features grad error {errors[1]:.2e}, ref_features grad error {errors[2]:.2e} "
            f"{'ok' if ok else 'TOO LARGE'}"
        )
    torch.backends.cuda.matmul.allow_tf32 = False
    return failures


if __name__ == "__main__":
    sys.exit(main())
