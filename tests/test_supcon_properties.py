"""Property-based tests of the compiled CPU op against the dense float64 reference.

Hypothesis draws N (0 to a few thousand), D, segment layouts with empty and one-row segments,
label layouts (one class, all ignored, sparse huge ids, many classes), temperatures, weightings
and dtypes, and checks the per-anchor loss, the positives and the gradient of a random upstream;
for the reference set also the key layouts (more or fewer keys than anchors, empty segments on
either side, self pairs) and the gradient of the keys.
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
    assert_reference_set_within_twice_eager_error,
    assert_within_twice_eager_error,
    make_reference_inputs,
    reference_loss_and_grad,
    reference_set_loss_and_grads,
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


def relabel(labels, layout):
    """The labels of a layout as an elementwise map (so a self pair keeps equal labels)."""
    if layout == "all-ignored":
        return torch.full_like(labels, IGNORE)
    if layout == "sparse-huge-ids":
        return torch.where(labels == IGNORE, labels, labels * 10**12 + 3)
    return labels


@st.composite
def paired_segments(draw):
    """Anchor and key segment lengths, the same number of each; empty and one-row segments on
    either side are common, and either side may be the larger."""
    count = draw(st.integers(1, 4))
    length = st.one_of(st.just(0), st.just(1), st.integers(0, 200))
    key_length = st.one_of(st.just(0), st.just(1), st.integers(0, 200), st.integers(200, 1500))
    anchors = draw(st.lists(length, min_size=count, max_size=count))
    keys = draw(st.lists(key_length, min_size=count, max_size=count))
    return anchors, keys


@PROFILE
@given(
    segments=paired_segments(),
    dim=st.sampled_from([1, 3, 16, 33, 130]),
    layout=st.sampled_from(LABEL_LAYOUTS),
    num_classes=st.integers(1, 6),
    ignored=st.sampled_from([0.0, 0.1, 0.5]),
    self_index=st.sampled_from([None, "some", "memory"]),
    temperature=st.floats(0.02, 2.0),
    prevalence=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**31),
)
def test_reference_set_op_matches_reference(
    segments, dim, layout, num_classes, ignored, self_index, temperature, prevalence, dtype, seed
):
    anchors, keys = segments
    classes = {"one-class": 1, "many-classes": 300}.get(layout, num_classes)
    inputs = make_reference_inputs(
        anchors, keys, dim, classes, ignored, self_index, dtype=dtype, seed=seed
    )
    inputs = inputs._replace(
        labels=relabel(inputs.labels, layout), ref_labels=relabel(inputs.ref_labels, layout)
    )
    upstream = torch.rand(
        inputs.features.shape[0], generator=torch.Generator().manual_seed(seed), dtype=dtype
    )
    z = inputs.features.clone().requires_grad_(True)
    k = inputs.ref_features.clone().requires_grad_(True)
    loss, _, positives, _ = torch.ops.mcsc.supcon_forward(
        z,
        inputs.labels,
        inputs.offsets,
        temperature,
        prevalence,
        IGNORE,
        k,
        *inputs[4:],
        anchor_gradient=True,
    )
    (loss * upstream).sum().backward()
    ref_loss, ref_positives, ref_grad_z, ref_grad_k = reference_set_loss_and_grads(
        inputs, prevalence, upstream, temperature=temperature
    )
    assert torch.equal(positives.long(), ref_positives)
    assert loss.dtype == z.grad.dtype == k.grad.dtype == dtype
    if dtype == torch.float64:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(z.grad, ref_grad_z, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(k.grad, ref_grad_k, rtol=1e-9, atol=1e-9)
    else:
        assert_reference_set_within_twice_eager_error(
            inputs, (loss, z.grad, k.grad), upstream, prevalence, temperature
        )
