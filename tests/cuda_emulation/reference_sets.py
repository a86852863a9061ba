"""Inputs and expected values of the op's reference-set (two-set) call, shared by the CUDA
kernels' tests: emulated (tests/test_cuda_emulated.py, asan_check.py) and on a GPU
(tests/test_cuda.py).

A case pairs anchor segments with reference ("key") segments of other lengths: empty and
one-row segments on either side, ignored rows on both, anchor classes that no key has, keys far
more numerous than anchors and the reverse, and own pairs (ref_self_index) marked for some
anchors, as a cross-batch memory marks the anchors it has just enqueued.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from supcon_cases import IGNORE, TEMPERATURE, make_inputs, scaled_atol

from mcsc.reference import supcon_per_anchor_reference


class ReferenceCase(NamedTuple):
    """anchor_lengths and key_lengths: segment lengths of each side (the same count); dim: D;
    anchor_classes, key_classes: labels are drawn from [0, classes) (anchor classes past
    key_classes are absent from the keys); ignored: fraction of ignored rows on each side;
    own_pairs: fraction of valid anchors given an own pair among their keys (None: no
    ref_self_index at all)."""

    anchor_lengths: list[int]
    key_lengths: list[int]
    dim: int
    anchor_classes: int
    key_classes: int
    ignored: float
    own_pairs: float | None


REFERENCE_CASES = {
    # Empty anchor segments against keys, anchors against no keys, one row against one row,
    # anchor segments straddling the 64- and 128-row tiles; D past the 32-column staging slice.
    "varlen": ReferenceCase([70, 0, 5, 129, 1, 0], [100, 3, 0, 64, 1, 20], 33, 5, 4, 0.1, 0.5),
    # K >> M: more keys than classify_rows stages at a time, and many column splits.
    "many-keys": ReferenceCase([40], [1100], 8, 3, 3, 0.05, 0.5),
    # M >> K, without ref_self_index.
    "many-anchors": ReferenceCase([300, 10], [20, 0], 16, 3, 3, 0.1, None),
    # D past the backward's 128 output columns and the mma kernels' resident depth.
    "deep": ReferenceCase([33], [70], 257, 4, 4, 0.0, 1.0),
}


class ReferenceInputs(NamedTuple):
    features: torch.Tensor  # (M, D) anchors
    labels: torch.Tensor  # (M,) int64
    segments: torch.Tensor  # (S + 1,) int64
    ref_features: torch.Tensor  # (K, D)
    ref_labels: torch.Tensor  # (K,) int64
    ref_segments: torch.Tensor  # (S + 1,) int64
    ref_self_index: torch.Tensor | None  # (M,) int64 or None

    def reference_args(self) -> dict:
        """The op's reference-set keyword arguments."""
        return {
            "ref_features": self.ref_features,
            "ref_labels": self.ref_labels,
            "ref_segments": self.ref_segments,
            "ref_self_index": self.ref_self_index,
        }


def make_reference_inputs(
    case: ReferenceCase, *, dtype=torch.float32, device="cpu", seed=0
) -> ReferenceInputs:
    """Unit-norm anchors and keys of `case`. An anchor given an own pair gets a distinct key of
    its segment and label, which then holds the anchor's own features (so leaving that pair in
    would change the loss a lot)."""
    features, labels, segments = make_inputs(
        case.anchor_lengths,
        case.dim,
        case.anchor_classes,
        case.ignored,
        dtype=torch.float64,
        seed=seed,
    )
    keys, key_labels, key_segments = make_inputs(
        case.key_lengths,
        case.dim,
        case.key_classes,
        case.ignored,
        dtype=torch.float64,
        seed=seed + 1,
    )
    self_index = None
    if case.own_pairs is not None:
        generator = torch.Generator().manual_seed(seed + 2)
        self_index = torch.full((labels.shape[0],), -1, dtype=torch.int64)
        for s in range(len(case.anchor_lengths)):
            taken = set()
            for i in range(int(segments[s]), int(segments[s + 1])):
                if (
                    labels[i] == IGNORE
                    or float(torch.rand(1, generator=generator)) >= case.own_pairs
                ):
                    continue
                free = [
                    j
                    for j in range(int(key_segments[s]), int(key_segments[s + 1]))
                    if key_labels[j] == labels[i] and j not in taken
                ]
                if free:
                    j = free[int(torch.randint(len(free), (1,), generator=generator))]
                    taken.add(j)
                    self_index[i] = j
                    keys[j] = features[i]
    return ReferenceInputs(
        features.to(device=device, dtype=dtype),
        labels.to(device),
        segments.to(device),
        keys.to(device=device, dtype=dtype),
        key_labels.to(device),
        key_segments.to(device),
        None if self_index is None else self_index.to(device),
    )


class ReferenceExpected(NamedTuple):
    loss: torch.Tensor  # (M,)
    lse: torch.Tensor  # (M,); meaningful where positives > 0
    positives: torch.Tensor  # (M,) int64
    anchor_grad: torch.Tensor  # (M, D): d loss_i / d features_i
    ref_grad: torch.Tensor  # (K, D): d(sum upstream * loss) / d ref_features


def reference_expected(
    inputs: ReferenceInputs,
    prevalence: bool,
    upstream: torch.Tensor,
    temperature: float = TEMPERATURE,
    *,
    exact: bool = True,
) -> ReferenceExpected:
    """The dense reference's values, differentiated with autograd: in float64 on the CPU
    (``exact``), or else eager PyTorch at the inputs' own dtype and device (the baseline of the
    2x rule). lse_i is the loss plus the mean similarity of i's positives."""
    if exact:
        inputs = ReferenceInputs(*(None if t is None else t.cpu() for t in inputs))
        inputs = inputs._replace(
            features=inputs.features.double(), ref_features=inputs.ref_features.double()
        )
        upstream = upstream.cpu().double()
    anchors = inputs.features.detach().clone().requires_grad_(True)
    keys = inputs.ref_features.detach().clone().requires_grad_(True)
    loss, positives = supcon_per_anchor_reference(
        anchors,
        inputs.labels,
        inputs.segments,
        temperature,
        prevalence,
        IGNORE,
        keys,
        inputs.ref_labels,
        inputs.ref_segments,
        inputs.ref_self_index,
    )
    anchor_grad = torch.zeros_like(anchors)
    ref_grad = torch.zeros_like(keys)
    if loss.requires_grad:  # not when no segment has an anchor and a key
        # Each loss_i depends on anchor i alone among the anchors: the gradient of the sum is
        # d loss_i / d features_i row by row.
        found = torch.autograd.grad(loss.sum(), anchors, retain_graph=True, allow_unused=True)[0]
        anchor_grad = anchor_grad if found is None else found
        found = torch.autograd.grad(
            (loss * upstream.to(loss.device, loss.dtype)).sum(), keys, allow_unused=True
        )[0]
        ref_grad = ref_grad if found is None else found
    return ReferenceExpected(
        loss.detach(),
        _lse_from_loss(inputs, loss.detach(), positives, temperature),
        positives,
        anchor_grad,
        ref_grad,
    )


def _lse_from_loss(inputs, loss, positives, temperature):
    """lse_i = loss_i + (1/|P(i)|) sum_{p in P(i)} s_ip for anchors (positives > 0), else 0."""
    lse = torch.zeros_like(loss)
    self_index = inputs.ref_self_index
    for s in range(inputs.segments.shape[0] - 1):
        start, stop = int(inputs.segments[s]), int(inputs.segments[s + 1])
        key_start, key_stop = int(inputs.ref_segments[s]), int(inputs.ref_segments[s + 1])
        if stop <= start or key_stop <= key_start:
            continue
        similarity = inputs.features[start:stop] @ inputs.ref_features[key_start:key_stop].T
        similarity = similarity / temperature
        columns = torch.arange(key_start, key_stop, device=loss.device)
        own = torch.zeros_like(similarity, dtype=torch.bool)
        if self_index is not None:
            own = columns[None, :] == self_index[start:stop, None]
        labels = inputs.labels[start:stop, None]
        positive = (
            (labels == inputs.ref_labels[None, key_start:key_stop]) & (labels != IGNORE) & ~own
        )
        count = positives[start:stop].clamp(min=1).to(similarity.dtype)
        mean = (similarity * positive).sum(dim=1) / count
        lse[start:stop] = torch.where(positives[start:stop] > 0, loss[start:stop] + mean, 0)
    return lse


def assert_close_to_reference(results, expected: ReferenceExpected, relative: float, names):
    """results and expected value by value (names label them), each within `relative` of the
    largest expected magnitude (at least 1)."""
    for name, value, truth in zip(names, results, expected):
        value = value.detach().cpu().double()
        torch.testing.assert_close(
            value, truth.double(), rtol=relative, atol=scaled_atol(truth, relative), msg=name
        )


def assert_within_twice_eager_error(results, inputs, prevalence, upstream, names):
    """Flash attention's rule for reduced precision, for the two-set call: the error against
    float64 on the same (already rounded) inputs is at most twice that of eager PyTorch at the
    inputs' dtype, plus a hair relative to the result's size. results: (loss, anchor_grad,
    ref_grad)."""
    eager = reference_expected(inputs, prevalence, upstream, exact=False)
    truth = reference_expected(inputs, prevalence, upstream)
    pairs = (
        (eager.loss, truth.loss),
        (eager.anchor_grad, truth.anchor_grad),
        (eager.ref_grad, truth.ref_grad),
    )
    for name, value, (eager_value, truth_value) in zip(names, results, pairs):
        assert bool(torch.isfinite(value).all()), f"{name} is not finite"
        if truth_value.numel() == 0:
            continue
        error = float((value.detach().cpu().double() - truth_value).abs().max())
        eager_error = float((eager_value.cpu().double() - truth_value).abs().max())
        assert error <= 2 * eager_error + 1e-6 * scaled_atol(truth_value, 1.0), (
            name,
            error,
            eager_error,
        )


def assert_matches_reference_set(results, inputs, prevalence, upstream, dtype, relative):
    """Two-set results (loss, lse, positives, anchor_grad, ref_grad) of kernels run on features
    of `dtype` against the float64 reference: dtypes and shapes, positives exactly; lse of the
    anchors within `relative` (1e-4 for fp16/bf16, whose products are exact); loss, anchor_grad
    and ref_grad within `relative` of the largest expected magnitude, or, with relative None
    (fp16/bf16), within twice eager PyTorch's error at that dtype."""
    loss, lse, positives, anchor_grad, ref_grad = results
    expected = reference_expected(inputs, prevalence, upstream)
    m, d = inputs.features.shape
    accumulation = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == dtype and ref_grad.dtype == dtype
    assert lse.dtype == anchor_grad.dtype == accumulation
    assert anchor_grad.shape == (m, d) and ref_grad.shape == inputs.ref_features.shape
    assert positives.dtype == torch.int32
    assert torch.equal(positives.cpu().long(), expected.positives)
    anchors = expected.positives > 0
    lse = lse.cpu()
    assert bool(torch.isfinite(lse[anchors]).all())
    lse_relative = relative or 1e-4
    torch.testing.assert_close(
        lse[anchors].double(),
        expected.lse[anchors],
        rtol=lse_relative,
        atol=scaled_atol(expected.lse, lse_relative),
    )
    names = ("loss", "anchor_grad", "ref_grad")
    if relative is None:
        assert_within_twice_eager_error(
            (loss, anchor_grad, ref_grad), inputs, prevalence, upstream, names
        )
    else:
        assert_close_to_reference(
            (loss, anchor_grad, ref_grad),
            (expected.loss, expected.anchor_grad, expected.ref_grad),
            relative,
            names,
        )
