"""The fused supervised contrastive loss on the CPU: against the dense reference over a grid of
shapes, temperatures and weightings, against peer formulas, its reductions and its Python-level
behaviour (bad input, fallback). The contract all backends share is test_supcon_contract.py."""

import itertools
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from supcon_cases import (
    REFERENCE_CASES,
    TEMPERATURE,
    ReferenceInputs,
    assert_reference_set_within_twice_eager_error,
    assert_within_twice_eager_error,
    make_inputs,
    make_reference_inputs,
    reference_loss_and_grad,
    reference_set_loss_and_grads,
)

import mcsc
from mcsc.reference import supcon_per_anchor_reference


def segment_layouts(n):
    """One segment; and a layout with empty and one-row segments around uneven blocks."""
    layouts = [torch.tensor([0, n])]
    if n >= 4:
        cut = n // 3
        layouts.append(torch.tensor([0, 0, 1, 1, cut, cut, n - 1, n]))
    return layouts


def fused_loss_and_grad(features, labels, segments, temperature, weighting, upstream):
    features = features.detach().clone().requires_grad_()
    loss = mcsc.supcon_loss(
        features,
        labels,
        temperature=temperature,
        segments=segments,
        weighting=weighting,
        reduction="none",
    )
    (grad,) = torch.autograd.grad((loss * upstream).sum(), features)
    return loss.detach(), grad


GRID = [
    (n, d, c, t)
    for (n, d), (c, t) in zip(
        itertools.product([1, 2, 7, 64, 1000], [1, 3, 16, 128, 130]),
        itertools.cycle(itertools.product([1, 2, 4, 14], [0.01, 0.1, 1.0])),
    )
] + [(5000, 128, 4, 0.1), (5000, 16, 14, 0.01)]


@pytest.mark.parametrize("weighting", ["prevalence", "none"])
@pytest.mark.parametrize("n,d,num_classes,temperature", GRID)
def test_float64_matches_reference(n, d, num_classes, temperature, weighting):
    features, labels, _ = make_inputs(
        [n], d, num_classes, 0.1, dtype=torch.float64, seed=n * 131 + d
    )
    upstream = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for segments in segment_layouts(n):
        loss, grad = fused_loss_and_grad(
            features, labels, segments, temperature, weighting, upstream
        )
        expected_loss, _, expected_grad = reference_loss_and_grad(
            features, labels, segments, weighting == "prevalence", upstream, temperature
        )
        torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "n,d,num_classes,temperature",
    [(64, 16, 4, 0.1), (1000, 128, 14, 0.1), (1000, 130, 2, 0.01), (5000, 128, 4, 0.1)],
)
def test_float32_error_within_twice_eager_float32(n, d, num_classes, temperature):
    features, labels, _ = make_inputs([n], d, num_classes, 0.1, seed=7)
    segments = segment_layouts(n)[-1]
    upstream = torch.ones(n)
    loss, grad = fused_loss_and_grad(
        features, labels, segments, temperature, "prevalence", upstream
    )
    assert_within_twice_eager_error(
        loss, grad, features, labels, segments, upstream, temperature=temperature
    )


@pytest.mark.parametrize("temperature", [0.01, 0.1])
def test_large_norms_stay_finite_and_accurate(temperature):
    # Similarities up to 9 * 9 / 0.01 = 8100 (just inside float32's limit of 8192): exp overflows
    # unless every shift is right.
    features, labels, segments = make_inputs(
        [300, 400], 32, 4, 0.1, dtype=torch.float64, max_norm=9.0, seed=3
    )
    upstream = torch.ones(700, dtype=torch.float64)
    loss, grad = fused_loss_and_grad(
        features, labels, segments, temperature, "prevalence", upstream
    )
    expected_loss, _, expected_grad = reference_loss_and_grad(
        features, labels, segments, True, upstream, temperature
    )
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-7)
    # In float32, s ~ 8e3 carries an absolute rounding error of ~1e-3 before any exp, so only a
    # relative bound is meaningful here; the 2x-eager rule is checked on normal ranges above.
    loss32, grad32 = fused_loss_and_grad(
        features.float(), labels, segments, temperature, "prevalence", upstream.float()
    )
    assert torch.isfinite(loss32).all() and torch.isfinite(grad32).all()
    torch.testing.assert_close(loss32.double(), expected_loss, rtol=1e-5, atol=1e-3)
    scale = expected_grad.abs().max()
    torch.testing.assert_close(grad32.double() / scale, expected_grad / scale, rtol=0, atol=1e-3)


def test_absent_classes_and_rows_without_positives():
    features, _, _ = make_inputs([6], 4, 2, 0.0, dtype=torch.float64, seed=2)
    labels = torch.tensor([0, 5, 5, 9, -1, 0])  # classes 1-4, 6-8 absent; 9 has one row
    loss = mcsc.supcon_loss(features, labels, reduction="none")
    expected, positives = supcon_per_anchor_reference(
        features, labels, torch.tensor([0, 6]), 0.1, True, -1
    )
    torch.testing.assert_close(loss, expected)
    assert loss[3] == 0 and loss[4] == 0
    assert positives.tolist() == [1, 1, 1, 0, -1, 1]


def test_reductions():
    features, labels, _ = make_inputs([50], 8, 3, 0.1, dtype=torch.float64, seed=4)
    per_anchor = mcsc.supcon_loss(features, labels, reduction="none")
    _, positives = supcon_per_anchor_reference(
        features, labels, torch.tensor([0, 50]), 0.1, True, -1
    )
    anchors = positives > 0
    torch.testing.assert_close(
        mcsc.supcon_loss(features, labels, reduction="sum"), per_anchor.sum()
    )
    torch.testing.assert_close(mcsc.supcon_loss(features, labels), per_anchor[anchors].mean())
    assert per_anchor[~anchors].eq(0).all()


def test_mean_without_any_anchor_is_zero_with_zero_gradient():
    features = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    loss = mcsc.supcon_loss(features, torch.tensor([0, 1, 2, -1]))
    loss.backward()
    assert loss.item() == 0.0 and features.grad.eq(0).all()


def test_repeated_calls_are_bit_identical():
    features, labels, _ = make_inputs([1500], 64, 4, 0.1, seed=6)
    segments = torch.tensor([0, 700, 1500])
    first = fused_loss_and_grad(features, labels, segments, 0.1, "prevalence", torch.ones(1500))
    for _ in range(3):
        again = fused_loss_and_grad(features, labels, segments, 0.1, "prevalence", torch.ones(1500))
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_none_weighting_equals_pytorch_metric_learning_supcon():
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    features, labels, _ = make_inputs([200], 16, 5, 0.0, dtype=torch.float64, seed=13)
    for temperature in (0.07, 0.5):
        expected = losses.SupConLoss(temperature=temperature)(features, labels)
        actual = mcsc.supcon_loss(features, labels, temperature=temperature, weighting="none")
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-8)


def mcsc_block_loss(z, y, temperature):
    """The public MCSC code's dense per-block formula: class-prevalence weighted denominator,
    mean log-probability of the positives, averaged over every row of the block."""
    n = z.shape[0]
    logits = z @ z.T / temperature
    same = (y[:, None] == y[None, :]).to(z.dtype)
    not_self = 1 - torch.eye(n, dtype=z.dtype)
    positives = same * not_self
    one_hot = F.one_hot(y).to(z.dtype)  # (n, C)
    class_counts = one_hot.sum(0)  # (C,)
    exp_logits = torch.exp(logits) * not_self
    per_class = exp_logits @ one_hot  # (n, C): sum of exp-similarities per class
    own_class = (per_class * one_hot).sum(1)
    counts_seen = class_counts[None, :] - one_hot  # each anchor's own class excludes itself
    others = torch.where(
        one_hot.bool(), torch.zeros_like(per_class), per_class / counts_seen.clamp(min=1)
    ).sum(1)
    denominator = own_class / (class_counts[y] - 1) + others
    log_prob = logits - torch.log(denominator)[:, None]
    mean_log_prob_positive = (positives * log_prob).sum(1) / positives.sum(1)
    return -mean_log_prob_positive.mean()


def test_prevalence_equals_public_mcsc_block_formula():
    generator = torch.Generator().manual_seed(14)
    blocks = [
        F.normalize(torch.randn(361, 16, generator=generator, dtype=torch.float64), dim=1)
        for _ in range(3)
    ]
    labels = [torch.randint(0, 4, (361,), generator=generator) for _ in range(3)]
    labels[2] = torch.where(labels[2] == 3, torch.tensor(0), labels[2])  # an absent class
    features = torch.cat(blocks)
    segments = torch.tensor([0, 361, 722, 1083])
    per_anchor = mcsc.supcon_loss(features, torch.cat(labels), segments=segments, reduction="none")
    for k in range(3):
        expected = mcsc_block_loss(blocks[k], labels[k], 0.1)
        torch.testing.assert_close(per_anchor[361 * k : 361 * (k + 1)].mean(), expected)


BAD_INPUTS = [
    ({"features": [[1.0]]}, TypeError, "features must be a torch.Tensor"),
    ({"features": torch.randn(4)}, ValueError, "features must have shape"),
    ({"features": torch.randn(4, 0)}, ValueError, "at least one column"),
    ({"features": torch.randn(4, 3).half()}, TypeError, "dtype"),
    ({"labels": torch.zeros(4)}, TypeError, "labels must be int64 or int32"),
    ({"labels": torch.zeros(3, dtype=torch.int64)}, ValueError, "labels must have shape"),
    ({"labels": torch.tensor([0, 1, -5, 2])}, ValueError, "labels must be in"),
    ({"labels": torch.tensor([0, 1, 7, 2]), "num_classes": 4}, ValueError, "num_classes"),
    ({"features": torch.tensor([[0.0], [float("nan")], [1.0], [2.0]])}, ValueError, "NaN"),
    ({"features": torch.tensor([[0.0], [float("inf")], [1.0], [2.0]])}, ValueError, "infinite"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"temperature": -1.0}, ValueError, "temperature"),
    ({"temperature": float("nan")}, ValueError, "temperature"),
    ({"temperature": "0.1"}, TypeError, "temperature"),
    ({"temperature": 1e-40}, ValueError, "1 / temperature is finite"),
    ({"features": torch.full((4, 3), 1e4)}, ValueError, "features are too large"),
    ({"segments": [0, 4]}, TypeError, "segments"),
    ({"segments": torch.tensor([0, 2.0, 4])}, TypeError, "segments"),
    ({"segments": torch.tensor([1, 4])}, ValueError, "start at 0"),
    ({"segments": torch.tensor([0, 3])}, ValueError, "end at N"),
    ({"segments": torch.tensor([0, 3, 2, 4])}, ValueError, "non-decreasing"),
    ({"segments": torch.tensor([[0, 4]])}, ValueError, "segments must be 1-D"),
    ({"weighting": "balanced"}, ValueError, "weighting"),
    ({"reduction": "max"}, ValueError, "reduction"),
    ({"ignore_index": 0.5}, TypeError, "ignore_index"),
    ({"labels": torch.zeros(4, dtype=torch.int64, device="meta")}, ValueError, "same device"),
]


@pytest.mark.parametrize("overrides,error,message", BAD_INPUTS)
def test_bad_input_raises_clear_error(overrides, error, message):
    arguments = {"features": torch.randn(4, 3), "labels": torch.tensor([0, 1, 0, 1])}
    arguments.update(overrides)
    features, labels = arguments.pop("features"), arguments.pop("labels")
    with pytest.raises(error, match=message):
        mcsc.supcon_loss(features, labels, **arguments)


def test_backend_reports_compiled_cpu():
    assert mcsc.backend("cpu") == "compiled-cpu"
    assert mcsc.ops.extension_problem() == ""


def test_missing_extension_falls_back_to_reference_with_one_warning():
    script = (
        "import sys, warnings\n"
        "sys.modules['mcsc._C'] = None  # makes 'from mcsc import _C' fail\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, mcsc\n"
        "    z = torch.nn.functional.normalize(torch.randn(30, 4, dtype=torch.float64), dim=1)\n"
        "    y = torch.arange(30) % 3\n"
        "    loss = mcsc.supcon_loss(z, y)\n"
        "    mcsc.supcon_loss(z, y)\n"
        "messages = [str(w.message) for w in caught if 'mcsc' in str(w.message)]\n"
        "assert len(messages) == 1, messages\n"
        "assert 'Falling back' in messages[0], messages\n"
        "assert mcsc.backend('cpu') == 'reference'\n"
        "print(float(loss))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) > 0


def test_direct_op_calls_are_checked_in_cpp():
    features, labels, _ = make_inputs([10], 4, 2, 0.1, dtype=torch.float64, seed=15)
    segments = torch.tensor([0, 10])
    with pytest.raises(RuntimeError, match="features must have shape"):
        torch.ops.mcsc.supcon_forward(features[:, 0], labels, segments, 0.1, True, -1)
    with pytest.raises(RuntimeError, match="segments must be int64"):
        torch.ops.mcsc.supcon_forward(features, labels, segments.int(), 0.1, True, -1)
    loss, lse, positives, anchor_grad = torch.ops.mcsc.supcon_forward(
        features, labels, segments, 0.1, True, -1
    )
    assert anchor_grad.shape == (0, 4)  # kept only for a reference set's anchors
    with pytest.raises(RuntimeError, match="positives must be int32"):
        torch.ops.mcsc.supcon_backward(
            torch.ones_like(loss), features, labels, segments, lse, positives.long(), 0.1, True
        )
    with pytest.raises(RuntimeError, match="lse must have shape"):
        torch.ops.mcsc.supcon_backward(
            torch.ones_like(loss), features, labels, segments, lse[:5], positives, 0.1, True
        )


# ---- The reference set ----------------------------------------------------------------------


def reference_set_call(
    inputs: ReferenceInputs, weighting="prevalence", reduction="none", **options
):
    """supcon_loss over a reference set, with both inputs requiring grad; returns the result and
    the leaf tensors (features, ref_features)."""
    features = inputs.features.detach().clone().requires_grad_(True)
    keys = inputs.ref_features.detach().clone().requires_grad_(True)
    result = mcsc.supcon_loss(
        features,
        inputs.labels,
        temperature=options.pop("temperature", TEMPERATURE),
        segments=inputs.offsets,
        weighting=weighting,
        reduction=reduction,
        ref_features=keys,
        ref_labels=inputs.ref_labels,
        ref_segments=inputs.ref_offsets,
        ref_self_index=inputs.ref_self_index,
        **options,
    )
    return result, features, keys


def reference_set_loss_and_grads_of_op(inputs, weighting, upstream):
    loss, features, keys = reference_set_call(inputs, weighting)
    grads = torch.autograd.grad((loss * upstream).sum(), (features, keys), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, (features, keys))]
    return loss.detach(), *grads


@pytest.mark.parametrize("weighting", ["prevalence", "none"])
@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_reference_set_float64_matches_reference(case, weighting):
    inputs = make_reference_inputs(**REFERENCE_CASES[case], dtype=torch.float64, seed=3)
    m = inputs.features.shape[0]
    upstream = torch.rand(m, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    loss, grad_features, grad_keys = reference_set_loss_and_grads_of_op(inputs, weighting, upstream)
    expected_loss, positives, expected_features, expected_keys = reference_set_loss_and_grads(
        inputs, weighting == "prevalence", upstream
    )
    _, _, op_positives, _ = torch.ops.mcsc.supcon_forward(
        inputs.features,
        inputs.labels,
        inputs.offsets,
        TEMPERATURE,
        weighting == "prevalence",
        -1,
        *inputs[3:],
    )
    assert torch.equal(op_positives.long(), positives)
    assert bool((positives > 0).any()) and bool((positives <= 0).any())
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_features, expected_features, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad_keys, expected_keys, rtol=1e-9, atol=1e-9)


def test_reference_set_of_the_anchors_themselves_is_the_single_set_call():
    """Keys = the anchors, each anchor marked as its own key: the single-set loss, and the sum
    of the two gradients is the single-set gradient (the features play both roles there)."""
    features, labels, offsets = make_inputs([0, 300, 1, 129], 16, 4, 0.1, dtype=torch.float64)
    own = torch.arange(features.shape[0])
    inputs = ReferenceInputs(features, labels, offsets, features, labels, offsets, own)
    upstream = torch.rand(features.shape[0], dtype=torch.float64)
    loss, grad_features, grad_keys = reference_set_loss_and_grads_of_op(
        inputs, "prevalence", upstream
    )
    single_loss, single_grad = fused_loss_and_grad(
        features, labels, offsets, TEMPERATURE, "prevalence", upstream
    )
    torch.testing.assert_close(loss, single_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_features + grad_keys, single_grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", ["varlen-self", "rare-key-classes"])
def test_reference_set_gradcheck_in_both_sets(case):
    options = dict(REFERENCE_CASES[case], dim=3)
    options["anchors"] = [min(length, 9) for length in options["anchors"]]
    options["keys"] = [min(length, 13) for length in options["keys"]]
    inputs = make_reference_inputs(**options, dtype=torch.float64, seed=5)
    for weighting in ("prevalence", "none"):
        assert torch.autograd.gradcheck(
            lambda z, k, weighting=weighting: mcsc.supcon_loss(
                z,
                inputs.labels,
                segments=inputs.offsets,
                weighting=weighting,
                reduction="none",
                ref_features=k,
                ref_labels=inputs.ref_labels,
                ref_segments=inputs.ref_offsets,
                ref_self_index=inputs.ref_self_index,
            ),
            (
                inputs.features.clone().requires_grad_(True),
                inputs.ref_features.clone().requires_grad_(True),
            ),
        )


@pytest.mark.parametrize("case", ["keys-much-more", "anchors-more", "memory-and-batch"])
def test_reference_set_float32_error_within_twice_eager_float32(case):
    inputs = make_reference_inputs(**REFERENCE_CASES[case], seed=11)
    upstream = torch.rand(inputs.features.shape[0], generator=torch.Generator().manual_seed(3))
    results = reference_set_loss_and_grads_of_op(inputs, "prevalence", upstream)
    assert_reference_set_within_twice_eager_error(inputs, results, upstream)
