"""One fused forward and backward on the GPU, for a kernel profiler to look at.

    ncu -k regex:supcon --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        python benchmarks/profile_step.py --n 16384 --dtype bfloat16

A warm-up call comes first (so the profiled launches are not the first), then --repeat timed
calls of the same size; the median forward and backward times (CUDA events) are printed. Kernel names
(all match ``regex:supcon``): supcon_forward_kernel, supcon_forward_combine_kernel,
supcon_backward_kernel and classify_rows_kernel; with MCSC_CUDA_KERNELS=mma also
supcon_forward_tiled_kernel and supcon_backward_mma_kernel. Like ``run.py``, it profiles
the ``mcsc`` Python imports and refuses one without its CUDA kernel unless ``--allow-reference``.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

# the package's own fallback warning: refused or restated by installed.py, with what to do
warnings.filterwarnings("ignore", message="mcsc: ")

import installed  # noqa: E402
import torch  # noqa: E402

from mcsc import supcon_loss  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384, help="rows (one segment)")
    parser.add_argument("--d", type=int, default=128, help="feature dimension")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument(
        "--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16", "float64")
    )
    parser.add_argument("--tf32", action="store_true", help="allow TF32 for float32")
    parser.add_argument("--repeat", type=int, default=1, help="timed calls (median printed)")
    parser.add_argument(
        "--allow-reference",
        action="store_true",
        help="run even when mcsc has no CUDA kernel (the dense fallback)",
    )
    args = parser.parse_args()
    installed.require_compiled("cuda", args.allow_reference)
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    generator = torch.Generator(device="cuda").manual_seed(0)
    features = torch.nn.functional.normalize(
        torch.randn(args.n, args.d, device="cuda", generator=generator), dim=1
    )
    features = features.to(getattr(torch, args.dtype)).requires_grad_(True)
    labels = torch.randint(0, args.classes, (args.n,), device="cuda", generator=generator)

    supcon_loss(features, labels, temperature=0.1).backward()  # warm-up
    forward_ms, backward_ms = [], []
    for _ in range(args.repeat):
        start, middle, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        features.grad = None
        start.record()
        loss = supcon_loss(features, labels, temperature=0.1)
        middle.record()
        loss.backward()
        end.record()
        torch.cuda.synchronize()
        forward_ms.append(start.elapsed_time(middle))
        backward_ms.append(middle.elapsed_time(end))
    print(
        f"N={args.n} D={args.d} {args.dtype}{' tf32' if args.tf32 else ''}: forward "
        f"{statistics.median(forward_ms):.2f} ms, backward {statistics.median(backward_ms):.2f} "
        f"ms (median of {args.repeat})"
    )


if __name__ == "__main__":
    main()
