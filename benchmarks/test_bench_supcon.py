"""pytest-benchmark cases for the main comparisons (not part of the unit tests).

    pytest benchmarks/ [--benchmark-only] [--benchmark-compare] [--allow-reference]

``pytest`` alone runs ``tests/`` only (``testpaths`` in pyproject.toml); these cases run when
``benchmarks/`` is named. Each case times one forward+backward of the loss (or one GEMM) on the
CPU; ``benchmarks/run.py`` is the full harness (interleaved rounds, ratios, peak memory, plots).
Timings are never asserted; only value agreement is. They time the installed ``mcsc`` (pytest
puts only this folder on ``sys.path``; ``python -m pytest`` would add the current directory),
and ``conftest.py`` refuses the dense fallback unless ``--allow-reference`` is given.
"""

from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")

import implementations as impls  # noqa: E402
import torch  # noqa: E402
from timing import TEMPERATURE  # noqa: E402

N, D, C = 2048, 128, 4


@pytest.fixture(scope="module")
def inputs():
    z, y = impls.make_inputs(N, D, C)
    return z.requires_grad_(True), y


def _fwd_bwd(name, z, y, bounds, weighting):
    z.grad = None
    loss = impls.IMPLEMENTATIONS[name](z, y, bounds, TEMPERATURE, weighting)
    loss.backward()
    return loss


@pytest.mark.parametrize(
    "name,weighting",
    [
        ("fused", "prevalence"),
        ("dense", "prevalence"),
        ("tiled", "prevalence"),
        ("compiled", "prevalence"),
        ("fused", "none"),
        ("pml", "none"),
    ],
)
def test_fwd_bwd(benchmark, inputs, name, weighting):
    z, y = inputs
    bounds = [0, N]
    benchmark.group = f"fwd+bwd N={N} D={D} C={C} {weighting}"
    benchmark.extra_info.update(
        N=N, D=D, C=C, weighting=weighting, mode="fwd+bwd", threads=torch.get_num_threads()
    )
    ref = float(_fwd_bwd("fused", z, y, bounds, weighting))
    loss = benchmark.pedantic(
        _fwd_bwd, args=(name, z, y, bounds, weighting), rounds=5, iterations=1, warmup_rounds=1
    )
    assert abs(float(loss) - ref) <= 1e-4 * abs(ref)


def test_gemm(benchmark, inputs):
    z, _ = inputs
    benchmark.group = f"fwd+bwd N={N} D={D} C={C} prevalence"
    with torch.no_grad():
        benchmark.pedantic(impls.gemm, args=(z, [0, N]), rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("name", ["fused", "dense"])
def test_training_step(benchmark, name):
    """4 blocks of 3610 rows + 1 of 1960 (a slice of the public code's 100-block step);
    ``dense`` loops over the blocks as the public code does."""
    sizes = impls.training_step_sizes(blocks=4)
    bounds = impls.segment_bounds(sizes)
    z, y = impls.make_inputs(sum(sizes), D, C)
    z.requires_grad_(True)
    benchmark.group = "training step 4x3610+1x1960"
    benchmark.extra_info.update(segments="4x3610+1x1960", mode="fwd+bwd")
    benchmark.pedantic(
        _fwd_bwd, args=(name, z, y, bounds, "prevalence"), rounds=3, iterations=1, warmup_rounds=1
    )
