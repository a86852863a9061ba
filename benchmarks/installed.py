"""The mcsc the benchmarks time: the importable package with its compiled kernel, or a refusal.

The benchmark scripts never put the repository root on ``sys.path``: run from a checkout, they
import the installed package (``pip install --no-build-isolation .``), or the source tree only
when the caller puts it there (``PYTHONPATH=.`` after ``python setup.py build_ext --inplace``).
Either way, a package without its compiled kernel would time the dense fallback under the name
``fused``; the scripts refuse that unless asked with ``--allow-reference``.
"""

from __future__ import annotations

import glob
import os
import sys

import mcsc

ALLOW_FLAG = "--allow-reference"


def add_allow_option(parser) -> None:
    """The command line's :data:`ALLOW_FLAG` (``args.allow_reference``)."""
    parser.add_argument(
        ALLOW_FLAG,
        action="store_true",
        help="time mcsc even when it runs the dense pure-PyTorch fallback",
    )


def package_directory() -> str:
    """The directory of the imported ``mcsc`` package."""
    return os.path.dirname(os.path.abspath(mcsc.__file__))


def refusal(device: str, flag: str = ALLOW_FLAG) -> str:
    """Why timing ``mcsc.supcon_loss`` on ``device`` would time the dense fallback, and how to
    install the compiled kernel ('' when the compiled kernel runs)."""
    if mcsc.backend(device) != "reference":
        return ""
    where = package_directory()
    if not glob.glob(os.path.join(where, "_C.*")):
        problem = f"{where} holds no compiled library _C (a source tree that was not built?)"
    elif mcsc.ops.extension_problem():
        problem = mcsc.ops.extension_problem()
    else:
        problem = f"the compiled library in {where} has no kernel for {device}"
    return (
        f"mcsc backend for {device} is 'reference': 'fused' would time the dense pure-PyTorch "
        f"fallback, not the fused kernel: {problem}.\n"
        f"Install the package from the checkout with `pip install --no-build-isolation .` and "
        f"run the benchmark without the checkout on PYTHONPATH, or build in place with "
        f"`python setup.py build_ext --inplace` and run with `PYTHONPATH=<checkout>`"
        + (" (a CUDA kernel needs nvcc and a CUDA build of torch)" if device == "cuda" else "")
        + f". Pass {flag} to time the fallback anyway."
    )


def require_compiled(device: str, allow_reference: bool) -> str:
    """``mcsc.backend(device)``; exits with :func:`refusal`'s message when that is the fallback
    and ``allow_reference`` is False."""
    message = refusal(device)
    if message and not allow_reference:
        raise SystemExit(message)
    return mcsc.backend(device)


def prepare_run(args) -> str | None:
    """What a benchmark script does before timing: None (and a line on stderr) when
    ``args.device`` is cuda without CUDA; else :func:`require_compiled`'s backend, after
    ``args.threads`` (when given) is applied and ``args.out`` is created."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return None
    backend = require_compiled(args.device, args.allow_reference)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    return backend


def describe_run(args, backend: str, kernel: str = "", **extra) -> dict:
    """What a benchmark records about its run: ``device``, ``threads``, ``torch``, ``extra``,
    ``machine`` (with ``args.machine_note``), the mcsc ``backend`` and its ``package``
    directory. Prints them in one line (``kernel``: a note on the compiled library, after the
    backend), then a warning when the timed mcsc is the dense fallback (``--allow-reference``)."""
    import reporting
    import torch

    run = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **extra,
        "machine": reporting.machine_description(args.device, args.machine_note),
        "backend": backend,
        "package": package_directory(),
    }
    print(
        f"mcsc backend: {backend}{kernel} from {run['package']}; torch {torch.__version__}; "
        f"threads {run['threads']}; machine: {run['machine']}"
    )
    if backend == "reference":
        print(f"WARNING (--allow-reference): {refusal(args.device)}")
    return run
