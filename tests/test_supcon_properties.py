"""Property-based tests of the compiled CPU op against the dense float64 reference.

Hypothesis draws N (0 to a few thousand), D, segment layouts with empty and one-row segments,
label layouts (one class, all ignored, sparse huge ids, many classes), temperatures, weightings
and dtypes, and checks the per-anchor loss, the positives and the gradient of a random upstream.
The default profile is derandomised (the same examples on every run, as CI needs) and bounded
to about a minute on two cores; MCSC_HYPOTHESIS_PROFILE=explore draws new examples, more of
them.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from supcon_cases import (
    IGNORE,
    assert_within_twice_eager_error,
    reference_loss_and_grad,
)

import mcsc

settings.register_profile(
    "supcon-ci",
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "supcon-explore", parent=settings.get_profile("supcon-ci"), max_examples=300, derandomize=False
)
PROFILE = settings.get_profile("supcon-" + os.environ.get("MCSC_HYPOTHESIS_PROFILE", "ci"))

pytestmark = pytest.mark.skipif(
    mcsc.backend("cpu") != "compiled-cpu", reason="the compiled CPU op is not available"
)

LABEL_LAYOUTS = ("random", "one-class", "all-ignored", "sparse-huge-ids", "many-classes")


@st.composite
def segment_lengths(draw):
    """Segment lengths summing to N, mostly small N; empty and one-row segments are common."""
    n = draw(st.one_of(st.integers(0, 70), st.integers(0, 600), st.integers(600, 3000)))
    lengths = []
    remaining = n
    while remaining > 0 and len(lengths) < 12:
        length = draw(st.one_of(st.just(0), st.just(1), st.integers(0, remaining)))
        lengths.append(min(length, remaining))
        remaining -= lengths[-1]
    lengths.append(remaining)
    if draw(st.booleans()):
        lengths.insert(draw(st.integers(0, len(lengths))), 0)
    return lengths


def draw_labels(n, layout, num_classes, ignored, generator):
    if layout == "all-ignored":
        return torch.full((n,), IGNORE, dtype=torch.int64)
    classes = {"one-class": 1, "many-classes": 300}.get(layout, num_classes)
    labels = torch.randint(0, classes, (n,), generator=generator)
    if layout == "sparse-huge-ids":
        labels = labels * 10**12 + 3
    labels[torch.rand(n, generator=generator) < ignored] = IGNORE
    return labels


@PROFILE
@given(
    lengths=segment_lengths(),
    dim=st.sampled_from([1, 2, 3, 16, 33, 128, 130]),
    layout=st.sampled_from(LABEL_LAYOUTS),
    num_classes=st.integers(1, 6),
    ignored=st.sampled_from([0.0, 0.1, 0.5]),
    temperature=st.floats(0.02, 2.0),
    prevalence=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**31),
)
def test_op_matches_reference(
    lengths, dim, layout, num_classes, ignored, temperature, prevalence, dtype, seed
):
    generator = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    features = torch.nn.functional.normalize(
        torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=1
    ).to(dtype)
    labels = draw_labels(n, layout, num_classes, ignored, generator)
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    upstream = torch.rand(n, generator=generator, dtype=torch.float64).to(dtype)

    z = features.clone().requires_grad_(True)
    loss, _, positives, _ = torch.ops.mcsc.supcon_forward(
        z, labels, offsets, temperature, prevalence, IGNORE
    )
    (loss * upstream).sum().backward()
    ref_loss, ref_positives, ref_grad = reference_loss_and_grad(
        features, labels, offsets, prevalence, upstream, temperature
    )
    assert torch.equal(positives.long(), ref_positives)
    assert loss.dtype == dtype and z.grad.dtype == dtype
    if dtype == torch.float64:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(z.grad, ref_grad, rtol=1e-9, atol=1e-9)
    else:
        assert_within_twice_eager_error(
            loss, z.grad, features, labels, offsets, upstream, prevalence, temperature
        )
