"""The emulated CUDA kernels' reference-set (two-set) call, shared by tests/test_cuda_emulated.py
and asan_check.py. Its inputs and expected values are tests/supcon_cases.py's
(KERNEL_REFERENCE_CASES, make_reference_inputs, assert_matches_reference_set), which
test_cuda.py runs on a GPU."""

from __future__ import annotations

import functools

from cuda_emulation import emulation
from supcon_cases import run_reference_set_call


def run_reference_set(kernels, inputs, prevalence, upstream, path, descending, **options):
    """(loss, lse, positives, anchor_grad, ref_grad) of the emulated kernels of `path` for the
    two-set call on `inputs` (a supcon_cases.ReferenceInputs): run_reference_set_call with the
    threads between barriers run in `descending` order; ``options`` (multiprocessors) go to the
    forward."""
    return run_reference_set_call(
        functools.partial(emulation.forward, kernels, path, descending=descending, **options),
        functools.partial(emulation.backward, kernels, path, descending=descending),
        inputs,
        prevalence,
        upstream,
    )
