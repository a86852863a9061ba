"""The contract every backend of the fused op passes, run against each of them.

Backends: the compiled CPU op (float64, float32), the CUDA op (float64, float32, float16,
bfloat16; skipped without a GPU) and the CUDA kernels emulated on the CPU (tests/cuda_emulation,
one backend per multiply path; skipped without the CUDA headers, which the emulation compiles
against). The contract: the dense float64 reference's loss, positives and gradient; gradcheck;
empty input; no anchor anywhere; label dtypes and values; features at both sides of the
similarity limit; and, for the registered ops (not the emulator, which is called directly),
opcheck, torch.compile, non-contiguous inputs and the compiled-call policy for bad values.
Backend-specific tests stay in test_supcon_op.py, test_cuda.py and test_cuda_emulated.py.

The reference set (anchors against separate key rows, tests/supcon_cases.py REFERENCE_CASES)
has the same contract, run on every backend with a ``per_anchor_reference`` method.
"""

from __future__ import annotations

import math

import pytest
import torch
from cuda_emulation import emulation
from supcon_cases import (
    CASES,
    IGNORE,
    REFERENCE_CASES,
    TEMPERATURE,
    ReferenceInputs,
    assert_compiled_matches_eager,
    assert_reference_set_within_twice_eager_error,
    assert_within_twice_eager_error,
    make_inputs,
    make_reference_inputs,
    reference_loss_and_grad,
    reference_set_loss_and_grads,
    scaled_atol,
)

from mcsc import supcon_loss
from mcsc.ops import _in_range_offsets, similarity_limit
from mcsc.ops import backend as op_backend

# Relative tolerance against the float64 reference of the exact multiply paths; float16 and
# bfloat16 follow the 2x-eager rule instead.
TOLERANCE = {
    (torch.float64, False): 1e-10,
    (torch.float32, False): 1e-4,
    (torch.float32, True): 1e-2,
}


class OpBackend:
    """torch.ops.mcsc on one device, for features of one dtype."""

    registered = True

    def __init__(self, device: str, dtype: torch.dtype):
        self.device, self.dtype, self.allow_tf32 = device, dtype, False

    def available(self) -> str:
        """'' when usable, else why not."""
        if self.device == "cuda" and not torch.cuda.is_available():
            return "needs a CUDA GPU"
        if op_backend(self.device) != f"compiled-{self.device}":
            return f"the compiled {self.device} op is not available"
        return ""

    def per_anchor(self, features, labels, offsets, prevalence, temperature, ignore_index):
        """(loss, lse, positives), differentiable in features."""
        loss, lse, positives, _ = torch.ops.mcsc.supcon_forward(
            features, labels, offsets, temperature, prevalence, ignore_index
        )
        return loss, lse, positives

    def per_anchor_reference(
        self, inputs, prevalence, temperature, ignore_index, features=None, ref_features=None
    ):
        """(loss, lse, positives) of a reference-set call on ``inputs`` (a ReferenceInputs),
        differentiable in ``features`` and ``ref_features`` (default: those of ``inputs``)."""
        features = inputs.features if features is None else features
        ref_features = inputs.ref_features if ref_features is None else ref_features
        loss, lse, positives, _ = torch.ops.mcsc.supcon_forward(
            features,
            inputs.labels,
            inputs.offsets,
            temperature,
            prevalence,
            ignore_index,
            ref_features,
            inputs.ref_labels,
            inputs.ref_offsets,
            inputs.ref_self_index,
            anchor_gradient=features.requires_grad,
        )
        return loss, lse, positives


class _EmulatedForward(torch.autograd.Function):
    """The emulated kernels as an autograd function of the anchors (features) and, with a
    reference set, the reference rows (ref_features), as mcsc.ops registers the op's: the
    anchors' gradient from the forward's anchor_grad, the reference rows' from the backward."""

    @staticmethod
    def forward(ctx, features, ref_features, kernels, labels, offsets, reference, options):
        temperature, prevalence, ignore_index, path = options
        ref_labels, ref_segments, ref_self_index = reference
        keys = {}
        if ref_features is not None:
            keys = {
                "ref_features": ref_features,
                "ref_labels": ref_labels,
                "ref_segments": ref_segments,
                "ref_self_index": ref_self_index,
            }
        loss, lse, positives, anchor_grad = run_both_orders(
            lambda descending: emulation.forward(
                kernels,
                path,
                features,
                labels,
                offsets,
                temperature,
                prevalence,
                ignore_index,
                descending,
                anchor_gradient=ref_features is not None,
                **keys,
            )
        )
        ctx.save_for_backward(features, labels, offsets, lse, positives, anchor_grad)
        ctx.keys, ctx.kernels, ctx.options = keys, kernels, options
        ctx.mark_non_differentiable(lse, positives)
        return loss, lse, positives

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_positives):
        features, labels, offsets, lse, positives, anchor_grad = ctx.saved_tensors
        temperature, prevalence, ignore_index, path = ctx.options
        grad_features = grad_keys = None

        def kernel_backward(descending):
            return (
                emulation.backward(
                    ctx.kernels,
                    path,
                    grad_loss.contiguous(),
                    features,
                    labels,
                    offsets,
                    lse,
                    positives,
                    temperature,
                    prevalence,
                    descending,
                    ignore_index,
                    **ctx.keys,
                ),
            )

        if not ctx.keys:
            (grad_features,) = run_both_orders(kernel_backward)
        else:
            grad_features = (grad_loss.to(anchor_grad.dtype)[:, None] * anchor_grad).to(
                features.dtype
            )
            if ctx.needs_input_grad[1]:
                (grad_keys,) = run_both_orders(kernel_backward)
        return grad_features, grad_keys, None, None, None, None, None


def run_both_orders(kernel_call):
    """The outputs of kernel_call(descending=False), checked bitwise equal to those with the
    threads between two barriers run in descending order (a missing barrier changes them)."""
    ascending, descending = kernel_call(False), kernel_call(True)
    for first, second in zip(ascending, descending):
        torch.testing.assert_close(
            first,
            second,
            rtol=0,
            atol=0,
            equal_nan=True,
            msg="the result depends on the order threads run between barriers: a barrier is "
            "missing, or shared memory is read before the block writes it",
        )
    return ascending


class EmulatedBackend:
    """The CUDA kernels of one multiply path, emulated on the CPU."""

    registered = False
    device = "cpu"
    _kernels = None

    def __init__(self, path: str):
        self.path = emulation.PATHS[path]
        self.dtype, self.allow_tf32 = self.path.dtype, self.path.allow_tf32

    def available(self) -> str:
        if not emulation.cuda_header_dirs():
            return "the emulation needs the CUDA headers (cuda_fp16.h)"
        if EmulatedBackend._kernels is None:
            EmulatedBackend._kernels = emulation.load()
        return ""

    def per_anchor(
        self,
        features,
        labels,
        offsets,
        prevalence,
        temperature,
        ignore_index,
        ref_features=None,
        ref_labels=None,
        ref_segments=None,
        ref_self_index=None,
    ):
        """(loss, lse, positives), differentiable in features and ref_features."""
        return _EmulatedForward.apply(
            features,
            ref_features,
            EmulatedBackend._kernels,
            labels,
            offsets,
            (ref_labels, ref_segments, ref_self_index),
            (temperature, prevalence, ignore_index, self.path),
        )


class ReferenceSetEmulatedBackend(EmulatedBackend):
    """An emulated path that also runs the reference-set contract. Only some paths do (one per
    kernel family and multiply: the emulation is slow); tests/test_cuda_emulated.py runs the
    reference set on every path."""

    def per_anchor_reference(
        self, inputs, prevalence, temperature, ignore_index, features=None, ref_features=None
    ):
        """(loss, lse, positives) of a reference-set call on ``inputs`` (anchors features,
        labels, offsets; keys ref_features, ref_labels, ref_offsets; ref_self_index),
        differentiable in ``features`` and ``ref_features`` (default: those of ``inputs``)."""
        return self.per_anchor(
            inputs.features if features is None else features,
            inputs.labels,
            inputs.offsets,
            prevalence,
            temperature,
            ignore_index,
            inputs.ref_features if ref_features is None else ref_features,
            inputs.ref_labels,
            inputs.ref_offsets,
            inputs.ref_self_index,
        )


# The emulated paths that run the reference-set contract.
REFERENCE_SET_PATHS = ("float64-fma", "bfloat16-wmma", "float16-mma", "float32-tf32-mma")

BACKENDS = {
    "cpu-float64": OpBackend("cpu", torch.float64),
    "cpu-float32": OpBackend("cpu", torch.float32),
    "cuda-float64": OpBackend("cuda", torch.float64),
    "cuda-float32": OpBackend("cuda", torch.float32),
    "cuda-float16": OpBackend("cuda", torch.float16),
    "cuda-bfloat16": OpBackend("cuda", torch.bfloat16),
    **{
        f"emulated-{path}": (
            ReferenceSetEmulatedBackend if path in REFERENCE_SET_PATHS else EmulatedBackend
        )(path)
        for path in emulation.PATHS
    },
}
REGISTERED = [name for name, backend in BACKENDS.items() if backend.registered]
FLOAT64 = [name for name, backend in BACKENDS.items() if backend.dtype == torch.float64]


@pytest.fixture(autouse=True)
def fresh_compiler_caches():
    """Each test compiles afresh: lambdas of one line share a code object, and their closures'
    recompilations would otherwise count against dynamo's recompile limit."""
    torch._dynamo.reset()


@pytest.fixture
def backend(request):
    chosen = BACKENDS[request.param]
    reason = chosen.available()
    if reason:
        pytest.skip(reason)
    return chosen


def on_backends(names):
    return pytest.mark.parametrize("backend", names, indirect=True)


def inputs(backend, *case, **options):
    return make_inputs(*case, dtype=backend.dtype, device=backend.device, **options)


def loss_and_grad(
    backend,
    features,
    labels,
    offsets,
    prevalence,
    upstream,
    temperature=TEMPERATURE,
    ignore_index=IGNORE,
):
    """(loss, lse, positives, d(sum upstream * loss)/dz) from the backend."""
    z = features.detach().requires_grad_(True)  # keeps the layout (clone would not, if strided)
    loss, lse, positives = backend.per_anchor(
        z, labels, offsets, prevalence, temperature, ignore_index
    )
    (loss * upstream.to(loss.dtype)).sum().backward()
    return loss.detach(), lse, positives, z.grad


def assert_saved_state_and_tolerance(backend, lse, positives, ref_positives):
    """The forward's saved state against the reference's positives: lse in the accumulation
    dtype and finite for anchors with positives, positives int32 and exact. Returns the
    backend's relative tolerance for loss and gradients (None: the 2x-eager rule)."""
    assert lse.dtype == (torch.float64 if backend.dtype == torch.float64 else torch.float32)
    assert positives.dtype == torch.int32
    assert torch.equal(positives.cpu().long(), ref_positives)
    assert bool(torch.isfinite(lse[positives > 0]).all())
    return TOLERANCE.get((backend.dtype, backend.allow_tf32))


def assert_matches_reference(
    backend, features, labels, offsets, prevalence, upstream, temperature=TEMPERATURE
):
    loss, lse, positives, grad = loss_and_grad(
        backend, features, labels, offsets, prevalence, upstream, temperature
    )
    ref_loss, ref_positives, ref_grad = reference_loss_and_grad(
        features, labels, offsets, prevalence, upstream, temperature
    )
    assert loss.dtype == backend.dtype and grad.dtype == backend.dtype
    relative = assert_saved_state_and_tolerance(backend, lse, positives, ref_positives)
    if relative is None:
        assert_within_twice_eager_error(
            loss,
            grad,
            features,
            labels,
            offsets,
            upstream.to(backend.dtype),
            prevalence,
            temperature,
        )
        return
    torch.testing.assert_close(
        loss.cpu().double(), ref_loss, rtol=relative, atol=scaled_atol(ref_loss, relative)
    )
    torch.testing.assert_close(
        grad.cpu().double(), ref_grad, rtol=relative, atol=scaled_atol(ref_grad, relative)
    )


@on_backends(list(BACKENDS))
@pytest.mark.parametrize("prevalence", [True, False], ids=["prevalence", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(backend, case, prevalence):
    features, labels, offsets = inputs(backend, *CASES[case])
    upstream = torch.rand(
        features.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    ).to(backend.device)
    assert_matches_reference(backend, features, labels, offsets, prevalence, upstream)


@on_backends(FLOAT64)
def test_gradcheck(backend):
    features, labels, offsets = inputs(backend, [1, 11, 0, 8], 5, 3, 0.1)
    features.requires_grad_(True)
    for prevalence in (True, False):
        assert torch.autograd.gradcheck(
            lambda z, prevalence=prevalence: backend.per_anchor(
                z, labels, offsets, prevalence, TEMPERATURE, IGNORE
            )[0],
            (features,),
        )


@on_backends(list(BACKENDS))
def test_empty_input(backend):
    features = torch.empty(0, 8, dtype=backend.dtype, device=backend.device)
    labels = torch.empty(0, dtype=torch.int64, device=backend.device)
    offsets = torch.zeros(3, dtype=torch.int64, device=backend.device)
    loss, lse, positives, grad = loss_and_grad(
        backend, features, labels, offsets, True, torch.empty(0, device=backend.device)
    )
    assert loss.shape == lse.shape == positives.shape == (0,)
    assert grad.shape == (0, 8) and grad.dtype == backend.dtype


@on_backends(list(BACKENDS))
def test_no_anchor_anywhere(backend):
    """All rows ignored or alone in their class: zero loss, zero gradient, nothing NaN."""
    features, _, offsets = inputs(backend, [5, 5], 8, 1, 0.0)
    labels = torch.tensor([IGNORE, 0, 1, 2, IGNORE, 0, 1, 2, 3, 4], device=backend.device)
    loss, _, positives, grad = loss_and_grad(
        backend, features, labels, offsets, True, torch.ones(10, device=backend.device)
    )
    assert positives.tolist() == [-1, 0, 0, 0, -1, 0, 0, 0, 0, 0]
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))


@on_backends(list(BACKENDS))
def test_label_types_and_values(backend):
    """int32 labels, huge and negative-free sparse int64 ids and another ignore_index give
    bitwise the results of compact int64 ids."""
    features, labels, offsets = inputs(backend, [130, 70], 24, 3, 0.2)
    upstream = torch.rand(features.shape[0], generator=torch.Generator().manual_seed(4))
    upstream = upstream.to(backend.device)
    expected = loss_and_grad(backend, features, labels, offsets, True, upstream)
    huge = torch.where(labels == IGNORE, labels, labels * (1 << 40) + 7)
    other_ignore = torch.where(labels == IGNORE, torch.full_like(labels, 255), labels)
    for these_labels, ignore_index in ((labels.int(), IGNORE), (huge, IGNORE), (other_ignore, 255)):
        result = loss_and_grad(
            backend, features, these_labels, offsets, True, upstream, ignore_index=ignore_index
        )
        for name, value, expected_value in zip(
            ("loss", "lse", "positives", "grad"), result, expected
        ):
            assert torch.equal(value, expected_value), name


def scaled_to(features, largest_similarity, temperature=TEMPERATURE):
    """features rescaled so that max_i |z_i|^2 / temperature is largest_similarity."""
    norm = float(torch.linalg.vector_norm(features.double(), dim=1).max())
    return (features.double() * (math.sqrt(largest_similarity * temperature) / norm)).to(
        features.dtype
    )


@on_backends(list(BACKENDS))
def test_just_inside_the_similarity_limit_is_finite_and_accurate(backend):
    """At 0.99 of similarity_limit the results are finite, the loss is as accurate as ever and
    the gradient's relative error is below 1e-3 (it grows with the similarities). TF32 rounds
    the features to 10 bits, which makes exp(s_ij) off by a factor of up to exp(2^-10 s_ij):
    only the loss is accurate at these similarities; the gradient is finite."""
    features, labels, offsets = inputs(backend, [200, 57], 16, 3, 0.1)
    features = scaled_to(features, 0.99 * similarity_limit(backend.dtype))
    upstream = torch.rand(
        features.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(5)
    ).to(backend.device)
    loss, _, _, grad = loss_and_grad(backend, features, labels, offsets, True, upstream)
    assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad).all())
    ref_loss, _, ref_grad = reference_loss_and_grad(features, labels, offsets, True, upstream)
    loss_relative = TOLERANCE.get((backend.dtype, backend.allow_tf32), 1e-2)
    torch.testing.assert_close(
        loss.cpu().double(), ref_loss, rtol=0, atol=scaled_atol(ref_loss, loss_relative)
    )
    if backend.allow_tf32:
        return
    grad_relative = max(loss_relative, 1e-3)
    torch.testing.assert_close(
        grad.cpu().double(), ref_grad, rtol=0, atol=scaled_atol(ref_grad, grad_relative)
    )


@on_backends(REGISTERED)
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_past_the_similarity_limit_raises(backend, mode):
    """Just past similarity_limit (and far past it, where sums would overflow) supcon_loss
    raises a ValueError naming features, eager or under torch.compile."""
    if mode == "compiled" and backend.device != "cpu":
        pytest.skip("compiled CUDA calls poison the result instead (tested below)")
    features, labels, offsets = inputs(backend, [200, 57], 16, 3, 0.1)
    loss = (
        supcon_loss
        if mode == "eager"
        else torch.compile(supcon_loss, fullgraph=True, backend="aot_eager")
    )
    limit = similarity_limit(backend.dtype)
    inside = loss(scaled_to(features, 0.99 * limit), labels, segments=offsets)
    assert bool(torch.isfinite(inside))
    for factor in (1.01, 1e30):
        with pytest.raises(ValueError, match="features are too large"):
            loss(scaled_to(features, factor * limit), labels, segments=offsets)


@on_backends(REGISTERED)
def test_opcheck(backend):
    features, labels, offsets = inputs(backend, [40, 0, 57], 20, 3, 0.1)
    features.requires_grad_(True)
    torch.library.opcheck(
        torch.ops.mcsc.supcon_forward.default,
        (features, labels, offsets, TEMPERATURE, True, IGNORE),
    )
    _, lse, positives, _ = torch.ops.mcsc.supcon_forward(
        features.detach(), labels, offsets, TEMPERATURE, True, IGNORE
    )
    grad_loss = torch.rand(features.shape[0], device=backend.device).to(backend.dtype)
    torch.library.opcheck(
        torch.ops.mcsc.supcon_backward.default,
        (grad_loss, features.detach(), labels, offsets, lse, positives, TEMPERATURE, False),
    )


@on_backends([name for name in REGISTERED if BACKENDS[name].dtype == torch.float32])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(backend, compiler):
    features, labels, offsets = inputs(backend, [300, 90], 16, 4, 0.05)
    assert_compiled_matches_eager(features, labels, offsets, compiler)


@on_backends(REGISTERED)
@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_non_contiguous_inputs(backend, layout):
    dense, labels, offsets = inputs(backend, [150, 150], 40, 3, 0.1)
    if layout == "transposed":
        features = dense.t().contiguous().t()
    else:
        features = torch.zeros(
            dense.shape[0], 2 * dense.shape[1], dtype=dense.dtype, device=dense.device
        )[:, ::2]
        features.copy_(dense)
    strided_labels = torch.stack([labels, labels], dim=1)[:, 0]
    assert not features.is_contiguous() and not strided_labels.is_contiguous()
    upstream = torch.rand(dense.shape[0], device=backend.device)
    loss, _, _, grad = loss_and_grad(backend, features, strided_labels, offsets, True, upstream)
    dense_loss, _, _, dense_grad = loss_and_grad(backend, dense, labels, offsets, True, upstream)
    assert torch.equal(loss, dense_loss)
    assert torch.equal(grad, dense_grad)
    assert grad.stride() == torch.empty_like(features).stride()


# ---- Bad values under torch.compile, where the Python checks cannot read the data ----------


def bad_values(features, labels):
    """(name, features, labels, supcon_loss options) per bad input eager calls reject."""
    n = features.shape[0]
    with_nan = features.clone()
    with_nan[3, 1] = float("nan")
    with_inf = features.clone()
    with_inf[n - 1, 0] = float("inf")
    ignored_nan = with_nan.clone()
    ignored_labels = labels.clone()
    ignored_labels[3] = IGNORE  # a NaN in an ignored row would leave the loss finite
    negative = labels.clone()
    negative[5] = -5
    device = features.device
    return [
        ("nan-feature", with_nan, labels, {}),
        ("inf-feature", with_inf, labels, {}),
        ("nan-in-ignored-row", ignored_nan, ignored_labels, {}),
        ("negative-label", features, negative, {}),
        ("label-past-num-classes", features, labels, {"num_classes": 2}),
        ("too-large", features * 1e20, labels, {}),
        (
            "segments-past-n",
            features,
            labels,
            {"segments": torch.tensor([0, 100, n + 7], device=device)},
        ),
        (
            "segments-not-starting-at-0",
            features,
            labels,
            {"segments": torch.tensor([5, 100, n], device=device)},
        ),
        (
            "decreasing-segments",
            features,
            labels,
            {"segments": torch.tensor([0, 150, 100, n], device=device)},
        ),
    ]


BAD_VALUE_NAMES = [name for name, *_ in bad_values(torch.zeros(6, 2), torch.zeros(6))]
# What the CPU kernel reports for each; the rest it cannot see (num_classes is not an argument
# of the op), so the compiled-call poison makes them NaN, as on CUDA.
CPU_KERNEL_ERRORS = {
    "nan-feature": "NaN or infinite",
    "inf-feature": "NaN or infinite",
    "nan-in-ignored-row": "NaN or infinite",
    "negative-label": "labels must be in",
    "too-large": "features are too large",
    "segments-past-n": "end at N",
    "segments-not-starting-at-0": "start at 0",
    "decreasing-segments": "non-decreasing",
}


@on_backends([name for name in REGISTERED if BACKENDS[name].dtype == torch.float32])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("bad", BAD_VALUE_NAMES)
def test_compiled_call_with_bad_values_is_never_silent(backend, compiler, bad):
    """On the CPU the kernel raises the eager call's ValueError; where the kernel cannot see
    the problem (and on CUDA, for every problem) loss and gradient are NaN."""
    features, labels, _ = inputs(backend, [200], 8, 3, 0.0)
    _, bad_features, bad_labels, options = next(
        case for case in bad_values(features, labels) if case[0] == bad
    )
    with pytest.raises(ValueError):
        supcon_loss(bad_features, bad_labels, **options)

    compiled = torch.compile(
        lambda z, y: supcon_loss(z, y, **options), fullgraph=True, backend=compiler
    )
    z = bad_features.clone().requires_grad_(True)
    if backend.device == "cpu" and bad in CPU_KERNEL_ERRORS:
        with pytest.raises(ValueError, match=CPU_KERNEL_ERRORS[bad]):
            compiled(z, bad_labels)
        return
    loss = compiled(z, bad_labels)
    loss.backward()
    assert bool(torch.isnan(loss)), f"compiled call returned {float(loss)} for {bad}"
    assert bool(torch.isnan(z.grad).any()), "the gradient is not poisoned"


def test_compiled_call_with_good_values_is_unchanged():
    """The poison is exactly 1 for good inputs: compiled results equal eager ones bitwise
    (aot_eager runs the same kernels)."""
    features, labels, offsets = make_inputs([120, 0, 80], 8, 3, 0.1)
    options = {"segments": offsets, "num_classes": 3, "reduction": "none"}
    compiled = torch.compile(
        lambda z: supcon_loss(z, labels, **options), fullgraph=True, backend="aot_eager"
    )
    eager_z, compiled_z = features.clone().requires_grad_(), features.clone().requires_grad_()
    eager, result = supcon_loss(eager_z, labels, **options), compiled(compiled_z)
    eager.sum().backward()
    result.sum().backward()
    assert torch.equal(result, eager) and torch.equal(compiled_z.grad, eager_z.grad)


@on_backends([name for name in BACKENDS if name.startswith("emulated-")])
def test_emulated_kernels_carry_the_compiled_call_poison(backend):
    """What the compiled-call policy needs of the CUDA kernels, checked on their emulation: bad
    labels and non-finite features, with offsets made in range, run without error (the address
    sanitizer run of test_cuda_emulated.py covers their memory safety), and a NaN upstream
    gradient makes the gradient NaN."""
    features, labels, _ = inputs(backend, [200], 8, 3, 0.0)
    offsets = _in_range_offsets(torch.tensor([3, 120, 90, 260]), features.shape[0])
    assert offsets.tolist() == [0, 120, 120, 200]
    bad_labels = labels.clone()
    bad_labels[5] = -5
    bad_features = features.clone()
    bad_features[7, 0] = float("nan")
    backend.per_anchor(bad_features, bad_labels, offsets, True, TEMPERATURE, IGNORE)
    upstream = torch.full((features.shape[0],), float("nan"))
    _, _, positives, grad = loss_and_grad(backend, features, labels, offsets, True, upstream)
    assert bool(torch.isnan(grad[positives > 0]).all())


# ---- The reference set ---------------------------------------------------------------------

REFERENCE_BACKENDS = [
    name for name, backend in BACKENDS.items() if hasattr(backend, "per_anchor_reference")
]


def reference_inputs(backend, case, **options):
    return make_reference_inputs(
        **REFERENCE_CASES[case], dtype=backend.dtype, device=backend.device, **options
    )


def reference_set_results(backend, inputs, prevalence, upstream, ignore_index=IGNORE):
    """(loss, lse, positives, grad features, grad ref_features) of sum(upstream * loss)."""
    features = inputs.features.detach().requires_grad_(True)  # keeps the layout
    keys = inputs.ref_features.detach().requires_grad_(True)
    loss, lse, positives = backend.per_anchor_reference(
        inputs, prevalence, TEMPERATURE, ignore_index, features, keys
    )
    (loss * upstream.to(loss.dtype)).sum().backward()
    return loss.detach(), lse, positives, features.grad, keys.grad


@on_backends(REFERENCE_BACKENDS)
@pytest.mark.parametrize("prevalence", [True, False], ids=["prevalence", "none"])
@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_reference_set_matches_reference(backend, case, prevalence):
    inputs = reference_inputs(backend, case)
    upstream = torch.rand(
        inputs.features.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    ).to(backend.device)
    loss, lse, positives, grad_features, grad_keys = reference_set_results(
        backend, inputs, prevalence, upstream
    )
    ref_loss, ref_positives, ref_features, ref_keys = reference_set_loss_and_grads(
        inputs, prevalence, upstream
    )
    assert loss.dtype == grad_features.dtype == grad_keys.dtype == backend.dtype
    relative = assert_saved_state_and_tolerance(backend, lse, positives, ref_positives)
    if relative is None:
        assert_reference_set_within_twice_eager_error(
            inputs, (loss, grad_features, grad_keys), upstream.to(backend.dtype), prevalence
        )
        return
    for value, expected in ((loss, ref_loss), (grad_features, ref_features), (grad_keys, ref_keys)):
        torch.testing.assert_close(
            value.cpu().double(), expected, rtol=relative, atol=scaled_atol(expected, relative)
        )


@on_backends([name for name in REFERENCE_BACKENDS if name in FLOAT64])
def test_reference_set_gradcheck(backend):
    inputs = make_reference_inputs(
        [1, 7, 0, 6],
        [9, 4, 3, 0],
        4,
        3,
        0.1,
        "some",
        dtype=torch.float64,
        device=backend.device,
        seed=8,
    )
    for prevalence in (True, False):
        assert torch.autograd.gradcheck(
            lambda z, k, prevalence=prevalence: backend.per_anchor_reference(
                inputs, prevalence, TEMPERATURE, IGNORE, z, k
            )[0],
            (
                inputs.features.clone().requires_grad_(True),
                inputs.ref_features.clone().requires_grad_(True),
            ),
        )


@on_backends(REFERENCE_BACKENDS)
@pytest.mark.parametrize("empty", ["anchors", "keys"])
def test_reference_set_with_an_empty_side(backend, empty):
    """No anchors: empty outputs and a zero key gradient. No keys: no anchor has a positive, so
    zero losses and zero gradients (and positives 0 for valid anchors)."""
    anchors, keys = ([0, 0], [40, 9]) if empty == "anchors" else ([30, 9], [0, 0])
    inputs = make_reference_inputs(
        anchors, keys, 8, 3, 0.1, dtype=backend.dtype, device=backend.device
    )
    m = inputs.features.shape[0]
    loss, lse, positives, grad_features, grad_keys = reference_set_results(
        backend, inputs, True, torch.ones(m, device=backend.device)
    )
    assert loss.shape == lse.shape == positives.shape == (m,)
    assert grad_features.shape == inputs.features.shape
    assert grad_keys.shape == inputs.ref_features.shape
    expected_positives = torch.where(inputs.labels == IGNORE, -1, 0).int()
    assert torch.equal(positives.cpu(), expected_positives.cpu())
    for value in (loss, grad_features, grad_keys):
        assert torch.equal(value, torch.zeros_like(value))


@on_backends(REFERENCE_BACKENDS)
def test_reference_set_label_types_and_values(backend):
    """int32 labels, huge sparse int64 ids and another ignore_index on both sides give bitwise
    the results of compact int64 ids."""
    inputs = reference_inputs(backend, "varlen-self")
    upstream = torch.rand(inputs.features.shape[0], generator=torch.Generator().manual_seed(4))
    upstream = upstream.to(backend.device)
    expected = reference_set_results(backend, inputs, True, upstream)

    def relabelled(change):
        return inputs._replace(labels=change(inputs.labels), ref_labels=change(inputs.ref_labels))

    variants = [
        (relabelled(lambda y: y.int()), IGNORE),
        (relabelled(lambda y: torch.where(y == IGNORE, y, y * (1 << 40) + 7)), IGNORE),
        (relabelled(lambda y: torch.where(y == IGNORE, torch.full_like(y, 255), y)), 255),
    ]
    for these, ignore_index in variants:
        result = reference_set_results(backend, these, True, upstream, ignore_index)
        for name, value, expected_value in zip(
            ("loss", "lse", "positives", "grad_features", "grad_ref_features"), result, expected
        ):
            assert torch.equal(value, expected_value), name


@on_backends([name for name in REFERENCE_BACKENDS if BACKENDS[name].registered])
def test_reference_set_opcheck(backend):
    inputs = make_reference_inputs(
        [40, 0, 57],
        [90, 20, 130],
        20,
        3,
        0.1,
        "some",
        dtype=backend.dtype,
        device=backend.device,
    )
    features = inputs.features.clone().requires_grad_(True)
    keys = inputs.ref_features.clone().requires_grad_(True)
    reference_args = (keys, inputs.ref_labels, inputs.ref_offsets, inputs.ref_self_index)
    # anchor_gradient keeps the anchors' gradient; without it only the keys may need one
    for anchors, anchor_gradient in ((features, True), (features.detach(), False)):
        torch.library.opcheck(
            torch.ops.mcsc.supcon_forward.default,
            (anchors, inputs.labels, inputs.offsets, TEMPERATURE, True, IGNORE, *reference_args),
            {"anchor_gradient": anchor_gradient},
        )
    _, lse, positives, _ = torch.ops.mcsc.supcon_forward(
        inputs.features, inputs.labels, inputs.offsets, TEMPERATURE, True, IGNORE, *inputs[3:]
    )
    grad_loss = torch.rand(features.shape[0], device=backend.device).to(backend.dtype)
    torch.library.opcheck(
        torch.ops.mcsc.supcon_backward.default,
        (
            grad_loss,
            inputs.features,
            inputs.labels,
            inputs.offsets,
            lse,
            positives,
            TEMPERATURE,
            False,
            IGNORE,
            *(inputs.ref_features, *inputs[4:]),
        ),
    )


def reference_set_step(inputs, **options):
    """normalise both sets + supcon_loss over the reference set, as a function of both."""

    def step(z, k):
        return supcon_loss(
            torch.nn.functional.normalize(z, dim=1),
            inputs.labels,
            segments=inputs.offsets,
            ref_features=torch.nn.functional.normalize(k, dim=1),
            ref_labels=inputs.ref_labels,
            ref_segments=inputs.ref_offsets,
            ref_self_index=inputs.ref_self_index,
            **options,
        )

    return step


@on_backends(
    [name for name in REFERENCE_BACKENDS if BACKENDS[name].registered and name.endswith("32")]
)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("keys_need_grad", [True, False], ids=["keys-grad", "keys-fixed"])
def test_reference_set_torch_compile_fullgraph_matches_eager(backend, compiler, keys_need_grad):
    inputs = reference_inputs(backend, "memory-and-batch")
    step = reference_set_step(inputs)
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    results = []
    for function in (step, compiled):
        z = inputs.features.clone().requires_grad_(True)
        k = inputs.ref_features.clone().requires_grad_(keys_need_grad)
        loss = function(z, k)
        loss.backward()
        results.append((loss.detach(), z.grad, k.grad))
    (eager, eager_z, eager_k), (result, result_z, result_k) = results
    torch.testing.assert_close(result, eager)
    torch.testing.assert_close(result_z, eager_z)
    if keys_need_grad:
        torch.testing.assert_close(result_k, eager_k)
    else:
        assert result_k is None and eager_k is None


@on_backends([name for name in REFERENCE_BACKENDS if BACKENDS[name].registered])
@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_reference_set_non_contiguous_inputs(backend, layout):
    inputs = reference_inputs(backend, "varlen-self")

    def relaid(dense):
        if layout == "transposed":
            return dense.t().contiguous().t()
        wide = torch.zeros(
            dense.shape[0], 2 * dense.shape[1], dtype=dense.dtype, device=dense.device
        )
        return wide[:, ::2].copy_(dense)

    strided = inputs._replace(
        features=relaid(inputs.features), ref_features=relaid(inputs.ref_features)
    )
    assert not strided.features.is_contiguous() and not strided.ref_features.is_contiguous()
    upstream = torch.rand(inputs.features.shape[0], device=backend.device)
    result = reference_set_results(backend, strided, True, upstream)
    expected = reference_set_results(backend, inputs, True, upstream)
    for value, expected_value in zip(result, expected):
        assert torch.equal(value, expected_value)
    assert result[3].stride() == torch.empty_like(strided.features).stride()
    assert result[4].stride() == torch.empty_like(strided.ref_features).stride()


def bad_reference_values(inputs: ReferenceInputs):
    """(name, inputs) per bad reference-set value that eager calls reject; ``inputs`` are two
    segments in the memory layout whose first segment's first 50 keys are memory rows, with
    self indices on anchors 0 and 1."""
    keys, key_labels, own = inputs.ref_features, inputs.ref_labels, inputs.ref_self_index
    k = keys.shape[0]
    device = keys.device

    def with_key(row, value):
        changed = keys.clone()
        changed[row, 1] = value
        return inputs._replace(ref_features=changed)

    def with_self(anchor, row):
        changed = own.clone()
        changed[anchor] = row
        return inputs._replace(ref_self_index=changed)

    negative = key_labels.clone()
    negative[7] = -5
    other_label = int((key_labels[:50] != inputs.labels[0]).nonzero()[0])
    return [
        ("nan-ref-feature", with_key(3, float("nan"))),
        ("inf-ref-feature", with_key(k - 1, float("inf"))),
        ("negative-ref-label", inputs._replace(ref_labels=negative)),
        ("ref-too-large", inputs._replace(ref_features=keys * 1e20)),
        (
            "ref-segments-past-k",
            inputs._replace(ref_offsets=torch.tensor([0, 50, k + 7], device=device)),
        ),
        (
            "ref-segments-decreasing",
            inputs._replace(ref_offsets=torch.tensor([0, k + 5, k], device=device)),
        ),
        ("self-index-past-k", with_self(0, k + 5)),
        ("self-index-below-minus-one", with_self(0, -2)),
        ("self-index-outside-segment", with_self(1, k - 1)),
        ("self-index-other-label", with_self(0, other_label)),
    ]


BAD_REFERENCE_VALUE_NAMES = [
    name
    for name, _ in bad_reference_values(
        make_reference_inputs([20, 20], [50, 50], 4, 3, 0.0, "memory", seed=1)
    )
]
# What the CPU kernel reports for each bad reference value.
CPU_KERNEL_REFERENCE_ERRORS = {
    "nan-ref-feature": "ref_features contain NaN or infinite",
    "inf-ref-feature": "ref_features contain NaN or infinite",
    "negative-ref-label": "ref_labels must be in",
    "ref-too-large": "features are too large",
    "ref-segments-past-k": "ref_segments must start at 0 and end at K",
    "ref-segments-decreasing": "ref_segments must be non-decreasing",
    "self-index-past-k": "ref_self_index must be -1 or a row",
    "self-index-below-minus-one": "ref_self_index must be -1 or a row",
    "self-index-outside-segment": "anchor's own segment",
    "self-index-other-label": "anchor's own label",
}


@on_backends(
    [name for name in REFERENCE_BACKENDS if BACKENDS[name].registered and name.endswith("32")]
)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("bad", BAD_REFERENCE_VALUE_NAMES)
def test_reference_set_compiled_call_with_bad_values_is_never_silent(backend, compiler, bad):
    """Bad reference values raise the eager call's ValueError; compiled, the CPU kernel raises
    it, and elsewhere loss and gradient are NaN."""
    inputs = make_reference_inputs(
        [20, 20], [50, 50], 4, 3, 0.0, "memory", seed=1, dtype=backend.dtype, device=backend.device
    )
    assert int(inputs.ref_self_index[0]) >= 0 and int(inputs.ref_self_index[1]) >= 0
    bad_inputs = dict(bad_reference_values(inputs))[bad]

    def call(z, k):
        return supcon_loss(
            z,
            bad_inputs.labels,
            segments=bad_inputs.offsets,
            ref_features=k,
            ref_labels=bad_inputs.ref_labels,
            ref_segments=bad_inputs.ref_offsets,
            ref_self_index=bad_inputs.ref_self_index,
        )

    with pytest.raises(ValueError):
        call(bad_inputs.features, bad_inputs.ref_features)
    compiled = torch.compile(call, fullgraph=True, backend=compiler)
    z = bad_inputs.features.clone().requires_grad_(True)
    k = bad_inputs.ref_features.clone().requires_grad_(True)
    if backend.device == "cpu":
        with pytest.raises(ValueError, match=CPU_KERNEL_REFERENCE_ERRORS[bad]):
            compiled(z, k)
        return
    loss = compiled(z, k)
    loss.backward()
    assert bool(torch.isnan(loss)), f"compiled call returned {float(loss)} for {bad}"
    assert bool(torch.isnan(z.grad).any()), "the gradient is not poisoned"
