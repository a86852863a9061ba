"""One small reference-set (two-set) forward and backward of the fused op per multiply path,
for compute-sanitizer on a GPU (.ci/gpu_check.sh), the two-set counterpart of
tests/sanitizer_case.py.

Runs the "varlen" reference-set case (empty and one-row segments on either side, ignored rows,
absent classes, own pairs) through torch.ops.mcsc with anchor_gradient and the keys' backward,
checks loss, the anchors' gradients and the keys' gradient against the float64 reference, and
prints OK.

    compute-sanitizer --tool racecheck python tests/cuda_emulation/reference_set_sanitizer_case.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cuda_emulation.reference_sets import (  # noqa: E402
    REFERENCE_CASES,
    make_reference_inputs,
    reference_expected,
)
from supcon_cases import IGNORE, TEMPERATURE  # noqa: E402


def main() -> int:
    inputs = make_reference_inputs(REFERENCE_CASES["varlen"], dtype=torch.float64)
    upstream = torch.rand(
        inputs.features.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    expected = reference_expected(inputs, True, upstream)
    scale = max(
        1.0,
        float(expected.loss.abs().max()),
        float(expected.anchor_grad.abs().max()),
        float(expected.ref_grad.abs().max()),
    )
    # (dtype, TF32 on, tolerance relative to the largest reference value, MCSC_CUDA_KERNELS)
    paths = [
        (torch.float64, False, 1e-9, "wmma"),
        (torch.float32, False, 1e-4, "wmma"),
        (torch.float32, True, 2e-2, "wmma"),
        (torch.float16, False, 3e-2, "wmma"),
        (torch.bfloat16, False, 1e-1, "wmma"),
        (torch.float32, False, 1e-4, "mma"),
        (torch.float32, True, 2e-2, "mma"),
        (torch.float16, False, 3e-2, "mma"),
        (torch.bfloat16, False, 1e-1, "mma"),
    ]
    failures = 0
    for dtype, tf32, tolerance, kernels in paths:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        os.environ["MCSC_CUDA_KERNELS"] = kernels
        cuda = inputs._replace(
            **{
                name: None if value is None else value.to("cuda")
                for name, value in inputs._asdict().items()
            }
        )
        cuda = cuda._replace(
            features=cuda.features.to(dtype), ref_features=cuda.ref_features.to(dtype)
        )
        keys = cuda.reference_args()
        loss, lse, positives, anchor_grad = torch.ops.mcsc.supcon_forward(
            cuda.features,
            cuda.labels,
            cuda.segments,
            TEMPERATURE,
            True,
            IGNORE,
            **keys,
            anchor_gradient=True,
        )
        ref_grad = torch.ops.mcsc.supcon_backward(
            upstream.to("cuda", lse.dtype),
            cuda.features,
            cuda.labels,
            cuda.segments,
            lse,
            positives,
            TEMPERATURE,
            True,
            IGNORE,
            **keys,
        )
        errors = [
            float((value.double().cpu() - truth).abs().max())
            for value, truth in (
                (loss, expected.loss),
                (anchor_grad, expected.anchor_grad),
                (ref_grad, expected.ref_grad),
            )
        ]
        ok = max(errors) <= tolerance * scale
        failures += not ok
        print(
            f"{dtype} tf32={tf32} {kernels}: loss error {errors[0]:.2e}, anchor_grad error "
            f"{errors[1]:.2e}, ref_grad error {errors[2]:.2e} {'ok' if ok else 'TOO LARGE'}"
        )
    torch.backends.cuda.matmul.allow_tf32 = False
    print("OK" if failures == 0 else f"{failures} paths failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
