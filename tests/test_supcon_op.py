"""The fused supervised contrastive loss on the CPU: against the dense reference over a grid of
shapes, temperatures and weightings, against peer formulas, its reductions and its Python-level
behaviour (bad input, fallback). The contract all backends share is test_supcon_contract.py."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

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


def reference_arguments():
    """A good reference-set call of supcon_loss on 4 anchors (two segments) and 6 keys."""
    return {
        "features": torch.nn.functional.normalize(torch.randn(4, 3), dim=1),
        "labels": torch.tensor([0, 1, 0, 1]),
        "segments": torch.tensor([0, 2, 4]),
        "ref_features": torch.nn.functional.normalize(torch.randn(6, 3), dim=1),
        "ref_labels": torch.tensor([0, 1, 1, 0, 1, 0]),
        "ref_segments": torch.tensor([0, 3, 6]),
        "ref_self_index": torch.tensor([-1, 1, 3, -1]),
    }


REFERENCE_BAD_INPUTS = [
    ({"ref_features": [[1.0, 0.0, 0.0]] * 6}, TypeError, "ref_features must be None or a torch"),
    ({"ref_features": torch.randn(6, 2)}, ValueError, r"ref_features must have shape \(K, D\)"),
    ({"ref_features": torch.randn(6)}, ValueError, r"ref_features must have shape \(K, D\)"),
    ({"ref_features": torch.randn(6, 3).double()}, TypeError, "ref_features must have the"),
    ({"ref_features": torch.randn(6, 3, device="meta")}, ValueError, "ref_features are on meta"),
    ({"ref_labels": None}, ValueError, "ref_labels must be given with ref_features"),
    ({"ref_labels": [0, 1, 1, 0, 1, 0]}, TypeError, "ref_labels must be a torch.Tensor"),
    ({"ref_labels": torch.zeros(6)}, TypeError, "ref_labels must be int64 or int32"),
    ({"ref_labels": torch.zeros(5, dtype=torch.int64)}, ValueError, "ref_labels must have shape"),
    (
        {"ref_labels": torch.zeros(6, dtype=torch.int64, device="meta")},
        ValueError,
        "ref_labels are on meta",
    ),
    ({"ref_labels": torch.tensor([0, 1, -3, 0, 1, 0])}, ValueError, "ref_labels must be in"),
    ({"labels": torch.tensor([0, -2, 0, 1])}, ValueError, "labels must be in"),
    (
        {"ref_labels": torch.tensor([0, 1, 1, 0, 9, 0]), "num_classes": 4},
        ValueError,
        "num_classes",
    ),
    ({"ref_segments": None}, ValueError, "segments and ref_segments go together"),
    ({"segments": None}, ValueError, "segments and ref_segments go together"),
    ({"ref_segments": torch.tensor([0, 6])}, ValueError, "ref_segments must have one offset"),
    ({"ref_segments": torch.tensor([0, 2.0, 6])}, TypeError, "ref_segments must be an int64"),
    ({"ref_segments": torch.tensor([1, 3, 6])}, ValueError, "ref_segments must start at 0"),
    ({"ref_segments": torch.tensor([0, 3, 5])}, ValueError, "ref_segments must start at 0 and end"),
    ({"ref_segments": torch.tensor([0, 7, 6])}, ValueError, "ref_segments must be non-decreasing"),
    ({"ref_self_index": [0, 1, 3, -1]}, TypeError, "ref_self_index must be None or a torch"),
    ({"ref_self_index": torch.tensor([0.0, 1, 3, -1])}, TypeError, "ref_self_index must be int64"),
    ({"ref_self_index": torch.tensor([0, 1, 3])}, ValueError, r"ref_self_index must have shape"),
    ({"ref_self_index": torch.tensor([-2, 1, 3, -1])}, ValueError, "ref_self_index must be -1 or"),
    ({"ref_self_index": torch.tensor([-1, 6, 3, -1])}, ValueError, "ref_self_index must be -1 or"),
    ({"ref_self_index": torch.tensor([-1, 4, 3, -1])}, ValueError, "anchor's own segment"),
    ({"ref_self_index": torch.tensor([-1, 0, 3, -1])}, ValueError, "anchor's own label"),
    (
        {"ref_features": torch.tensor([[float("nan"), 0, 0]] * 6)},
        ValueError,
        "ref_features contain NaN",
    ),
    ({"ref_features": torch.full((6, 3), 1e4)}, ValueError, "features are too large"),
]


@pytest.mark.parametrize("overrides,error,message", REFERENCE_BAD_INPUTS)
def test_reference_set_bad_input_raises_clear_error(overrides, error, message):
    arguments = reference_arguments()
    arguments.update(overrides)
    features, labels = arguments.pop("features"), arguments.pop("labels")
    with pytest.raises(error, match=message):
        mcsc.supcon_loss(features, labels, **arguments)


@pytest.mark.parametrize("name", ["ref_labels", "ref_segments", "ref_self_index"])
def test_reference_arguments_without_ref_features_raise(name):
    arguments = reference_arguments()
    features, labels = arguments.pop("features"), arguments.pop("labels")
    with pytest.raises(ValueError, match=f"{name} was given without ref_features"):
        mcsc.supcon_loss(features, labels, **{name: arguments[name]})


@pytest.mark.parametrize(
    "overrides,error,message",
    # num_classes is no argument of the op: compiled, a label past it makes the loss NaN
    # (test_supcon_contract.py); meta tensors are no compiled CPU call
    [
        case
        for case in REFERENCE_BAD_INPUTS
        if case[2] != "num_classes" and "meta" not in str(case[0])
    ],
)
def test_reference_set_bad_input_raises_under_torch_compile(overrides, error, message):
    """Compiled (graph breaks allowed), each bad input raises the eager error: the structural
    ones from the Python checks while tracing, the bad values from the CPU kernel."""
    arguments = reference_arguments()
    arguments.update(overrides)
    features, labels = arguments.pop("features"), arguments.pop("labels")
    torch._dynamo.reset()
    compiled = torch.compile(lambda z, y: mcsc.supcon_loss(z, y, **arguments), backend="aot_eager")
    with pytest.raises(error, match=message):
        compiled(features, labels)


def test_direct_reference_op_calls_are_checked_in_cpp():
    """torch.ops.mcsc called directly (no Python checks): ValueError/TypeError naming the
    argument before a kernel could index out of bounds."""
    arguments = reference_arguments()
    z, y, offsets = arguments["features"], arguments["labels"], arguments["segments"]
    keys, key_labels = arguments["ref_features"], arguments["ref_labels"]
    key_offsets, own = arguments["ref_segments"], arguments["ref_self_index"]
    forward = torch.ops.mcsc.supcon_forward
    with pytest.raises(ValueError, match="anchor_gradient=True needs ref_features"):
        forward(z, y, offsets, 0.1, True, -1, anchor_gradient=True)
    with pytest.raises(ValueError, match="ref_labels was given without ref_features"):
        forward(z, y, offsets, 0.1, True, -1, None, key_labels)
    with pytest.raises(ValueError, match="ref_self_index was given without ref_features"):
        forward(z, y, offsets, 0.1, True, -1, ref_self_index=own)
    bad_calls = [
        ((keys[:, :2], key_labels, key_offsets, own), ValueError, "ref_features must have shape"),
        ((keys.double(), key_labels, key_offsets, own), TypeError, "ref_features must have the"),
        ((keys, None, key_offsets, own), ValueError, "ref_labels must be given"),
        ((keys, key_labels[:5], key_offsets, own), ValueError, "ref_labels must have shape"),
        ((keys, key_labels.float(), key_offsets, own), TypeError, "ref_labels must be int64"),
        ((keys, key_labels, None, own), ValueError, "ref_segments must be given"),
        ((keys, key_labels, key_offsets[1:], own), ValueError, r"ref_segments must have shape"),
        ((keys, key_labels, key_offsets.int(), own), TypeError, "ref_segments must be int64"),
        ((keys, key_labels, key_offsets, own.int()), TypeError, "ref_self_index must be int64"),
        ((keys, key_labels, key_offsets, own[:3]), ValueError, "ref_self_index must have shape"),
        ((keys, key_labels, torch.tensor([0, 3, 9]), own), ValueError, "end at K=6"),
        ((keys, key_labels, key_offsets, own + 7), ValueError, "ref_self_index must be -1 or"),
    ]
    for reference_args, error, message in bad_calls:
        with pytest.raises(error, match=message):
            forward(z, y, offsets, 0.1, True, -1, *reference_args, anchor_gradient=True)
    loss, lse, positives, anchor_grad = forward(
        z, y, offsets, 0.1, True, -1, keys, key_labels, key_offsets, own, anchor_gradient=True
    )
    assert anchor_grad.shape == z.shape and anchor_grad.dtype == torch.float32
    assert forward(z, y, offsets, 0.1, True, -1, keys, key_labels, key_offsets)[3].shape == (0, 3)
    backward = torch.ops.mcsc.supcon_backward
    grad_loss = torch.ones_like(loss)
    grad_keys = backward(
        grad_loss, z, y, offsets, lse, positives, 0.1, True, -1, keys, key_labels, key_offsets, own
    )
    assert grad_keys.shape == keys.shape
    for reference_args, error, message in bad_calls[:-2]:
        with pytest.raises(error, match=message):
            backward(grad_loss, z, y, offsets, lse, positives, 0.1, True, -1, *reference_args)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_set_reductions(reduction):
    inputs = make_reference_inputs(**REFERENCE_CASES["varlen-self"], dtype=torch.float64)
    per_anchor, _, _ = reference_set_call(inputs)
    result, _, _ = reference_set_call(inputs, reduction=reduction)
    expected, positives, _, _ = reference_set_loss_and_grads(inputs, True, per_anchor)
    torch.testing.assert_close(per_anchor.detach(), expected)
    anchors = positives > 0
    assert per_anchor[~anchors].eq(0).all()
    wanted = {
        "none": per_anchor,
        "sum": per_anchor.sum(),
        "mean": per_anchor[anchors].mean(),
    }[reduction]
    torch.testing.assert_close(result, wanted)


def test_reference_set_without_any_anchor_is_zero_with_zero_gradients():
    arguments = reference_arguments()
    arguments["ref_labels"] = torch.tensor([2, 2, 2, 3, 3, 3])  # no key shares an anchor's class
    arguments["ref_self_index"] = None
    features = arguments.pop("features").requires_grad_(True)
    keys = arguments.pop("ref_features").requires_grad_(True)
    loss = mcsc.supcon_loss(features, arguments.pop("labels"), ref_features=keys, **arguments)
    loss.backward()
    assert loss.item() == 0.0 and features.grad.eq(0).all() and keys.grad.eq(0).all()


def test_reference_set_repeated_calls_are_bit_identical_at_any_thread_count():
    """Each anchor (key) row is owned by one thread at a time and summed in a fixed order, and
    a forward's key chunks are fixed by the sizes alone: the same bits at 1 and 2 threads."""
    inputs = make_reference_inputs([700, 0, 100], [3000, 50, 1500], 32, 4, 0.1, "memory")
    upstream = torch.rand(inputs.features.shape[0], generator=torch.Generator().manual_seed(9))
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (2, 1, 2):
            torch.set_num_threads(count)
            results.append(reference_set_loss_and_grads_of_op(inputs, "prevalence", upstream))
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        for value, first in zip(result, results[0]):
            assert torch.equal(value, first)


def test_reference_set_large_norms_stay_finite_and_accurate():
    """Similarities up to 7 * 7 / 0.01 = 4900: the wide-range tiles (own shifts) and the key
    sums' rescaling when a row's running maximum grows."""
    inputs = make_reference_inputs(
        [300, 90], [900, 700], 16, 3, 0.1, "some", dtype=torch.float64, max_norm=7.0, seed=4
    )
    upstream = torch.rand(inputs.features.shape[0], dtype=torch.float64)
    loss, features, keys = reference_set_call(inputs, temperature=0.01)
    grads = torch.autograd.grad((loss * upstream).sum(), (features, keys))
    expected_loss, _, expected_features, expected_keys = reference_set_loss_and_grads_at(
        inputs, upstream, 0.01
    )
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(grads[0], expected_features, rtol=1e-9, atol=1e-7)
    torch.testing.assert_close(grads[1], expected_keys, rtol=1e-9, atol=1e-7)


def reference_set_loss_and_grads_at(inputs, upstream, temperature):
    """reference_set_loss_and_grads (float64, prevalence) at another temperature."""
    features = inputs.features.detach().clone().requires_grad_(True)
    keys = inputs.ref_features.detach().clone().requires_grad_(True)
    loss, positives = supcon_per_anchor_reference(
        features, inputs.labels, inputs.offsets, temperature, True, -1, keys, *inputs[4:]
    )
    grads = torch.autograd.grad((loss * upstream).sum(), (features, keys))
    return loss.detach(), positives, *grads


MEMORY_SCRIPT = """
import torch, mcsc
torch.set_num_threads(2)
assert mcsc.backend("cpu") == "compiled-cpu", mcsc.ops.extension_problem()
m, k, d = 512, 65536, 64
generator = torch.Generator().manual_seed(0)
features = torch.nn.functional.normalize(torch.randn(m, d, generator=generator), dim=1)
keys = torch.nn.functional.normalize(torch.randn(k, d, generator=generator), dim=1)
labels = torch.randint(0, 10, (m,), generator=generator)
key_labels = torch.randint(0, 10, (k,), generator=generator)

def step(rows, key_rows):
    z = features[:rows].clone().requires_grad_(True)
    y = keys[:key_rows].clone().requires_grad_(True)
    loss = mcsc.supcon_loss(z, labels[:rows], ref_features=y, ref_labels=key_labels[:key_rows])
    loss.backward()

def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024

step(300, 200)  # threads, BLAS buffers and the op loaded at a small size
with open("/proc/self/clear_refs", "w") as reset:
    reset.write("5")  # VmHWM := VmRSS
before = peak()
step(m, k)
print(peak() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_reference_set_memory_stays_linear(tmp_path):
    """512 anchors against 65536 keys (D = 64, both needing grad): the call's extra peak memory
    (a fresh process's VmHWM) is the inputs' copies and gradients, far below the 128 MiB of one
    dense (M, K) float32 similarity matrix. The process imports the mcsc this test runs (run from
    another folder, `python -c` would put the current one first on sys.path)."""
    package_parent = str(Path(mcsc.__file__).resolve().parent.parent)
    environment = dict(os.environ, PYTHONPATH=package_parent)
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env=environment,
    )
    assert result.returncode == 0, result.stderr
    extra = int(result.stdout.split()[-1]) / 2**20
    # the key copy and the key gradient are 16 MiB each
    assert extra < 48, f"{extra:.1f} MiB"
