"""The fused supervised contrastive loss: public function, input checks and op registration.

The compiled extension (``mcsc._C``) defines two operators in the ``mcsc`` namespace:

* ``mcsc::supcon_forward(features, labels, segments, temperature, prevalence, ignore_index)``
  returns the per-anchor loss (N,), the log-denominator ``lse`` (N,) and the number of
  positives (N,) int32 (-1 for ignored rows);
* ``mcsc::supcon_backward(grad_loss, features, labels, segments, lse, positives, temperature,
  prevalence)`` returns the gradient with respect to ``features``.

Autograd and fake (meta) kernels are registered here with ``torch.library`` so the op works with
``torch.compile``. When the extension cannot be loaded, ``supcon_loss`` falls back to the dense
reference in ``mcsc.reference`` after one warning; :func:`backend` says which path runs.
"""

from __future__ import annotations

import math
import numbers
import warnings
from pathlib import Path

import torch

from mcsc import reference

WEIGHTINGS = ("prevalence", "none")
_REDUCTIONS = ("mean", "sum", "none")
_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# How to rebuild the library against the torch that runs it; --no-deps keeps that torch.
REBUILD_COMMAND = (
    "pip install --no-build-isolation --no-deps --force-reinstall .` in the mcsc source folder "
    "(or `python setup.py build_ext --inplace` for a source checkout on PYTHONPATH)"
)


def _load_extension() -> tuple[bool, str]:
    """Import the compiled library; returns (loaded, reason it is not)."""
    package = Path(__file__).resolve().parent
    if not any(package.glob("_C.*")):
        return False, (
            f"the compiled library mcsc._C is not in {package} (a source tree that was not "
            f"built, or an install that failed to compile it); build it with `{REBUILD_COMMAND}"
        )
    try:
        from mcsc import _C
    except (ImportError, OSError) as error:
        return False, (
            f"the compiled library mcsc._C in {package} could not be loaded ({error}); it was "
            f"probably built for another torch than the running {torch.__version__}: rebuild it "
            f"with `{REBUILD_COMMAND}"
        )
    built_with = _C.built_with_torch
    if built_with != torch.__version__:
        return False, (
            f"mcsc._C was compiled against torch {built_with} but torch {torch.__version__} "
            f"is running; rebuild it against this torch with `{REBUILD_COMMAND}"
        )
    return True, ""


_EXTENSION_LOADED, _EXTENSION_PROBLEM = _load_extension()
if not _EXTENSION_LOADED:
    warnings.warn(
        f"mcsc: {_EXTENSION_PROBLEM}. Falling back to the slow dense pure-PyTorch reference "
        f"(memory O(N^2)).",
        RuntimeWarning,
        stacklevel=2,
    )


def _registered_kernels() -> dict[str, bool]:
    """Device types with a compiled kernel; fixed once the extension is loaded."""
    return {
        device_type: _EXTENSION_LOADED
        and torch._C._dispatch_has_kernel_for_dispatch_key("mcsc::supcon_forward", key)
        for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    }


_KERNELS = _registered_kernels()


def _has_kernel(device_type: str) -> bool:
    return _KERNELS.get(device_type, False)


def backend(device: str | torch.device = "cpu") -> str:
    """Which implementation ``supcon_loss`` runs for tensors on ``device``.

    Returns ``"compiled-cpu"``, ``"compiled-cuda"`` or ``"reference"`` (the dense pure-PyTorch
    fallback, used when the extension could not be loaded or has no kernel for that device).
    """
    device_type = torch.device(device).type
    return f"compiled-{device_type}" if _has_kernel(device_type) else "reference"


def extension_problem() -> str:
    """Why the compiled extension is not in use ('' when it is)."""
    return _EXTENSION_PROBLEM


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the op's ``lse`` output and of its sums for features of ``dtype``: float64
    for float64 features, float32 for every other dtype (as the kernels' C++ rule)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def similarity_limit(dtype: torch.dtype) -> float:
    """The largest ``max_i |z_i|^2 / temperature`` the op accepts for features of ``dtype``:
    ``2^-10 / eps`` of the accumulation dtype, 8192 for float32 sums (float32, float16, bfloat16
    features) and 4.4e12 for float64.

    The kernels store ``lse_i`` rounded to the accumulation dtype, so the gradient's relative
    error grows as about ``0.4 eps max_i |z_i|^2 / t``; within the limit it stays below 1e-3
    and every result stays finite (the per-anchor loss, at most ``2 * limit + log N``, fits
    even float16). The kernels' C++ checks apply the same rule (``similarity_limit`` in
    csrc/supcon_checks.h).
    """
    return 2.0**-10 / torch.finfo(accumulation_dtype(dtype)).eps


def _largest_similarity(features: torch.Tensor, temperature: float) -> torch.Tensor:
    """max_i |z_i|^2 / temperature as a 0-dim float64 tensor (inf where a norm overflows)."""
    if features.shape[0] == 0:
        return torch.zeros((), dtype=torch.float64, device=features.device)
    return torch.linalg.vector_norm(features, dim=1).amax().double().square() / temperature


def _value_checks(features, labels, offsets, temperature, ignore_index, num_classes):
    """The checks that need the data: a (K,) bool tensor, True where check k fails, and the K
    functions that write each check's message. Eager calls read the flags with one device sync
    and raise on the first that fails; compiled calls, which cannot branch on data, poison the
    result with their any() (see supcon_loss)."""
    n = features.shape[0]
    valid = labels != ignore_index
    limit = similarity_limit(features.dtype)
    largest = _largest_similarity(features, temperature)
    problems = [
        (
            (valid & (labels < 0)).any(),
            lambda: (
                f"labels must be in [0, C) or equal ignore_index={ignore_index}; found "
                f"{int(labels[valid].min())}"
            ),
        ),
        (~torch.isfinite(features).all(), lambda: "features contain NaN or infinite values"),
        (
            largest > limit,
            lambda: (
                f"features are too large: max_i |z_i|^2 / temperature = {float(largest):.4g} "
                f"exceeds {limit:.4g} for {features.dtype}, past which the gradient's rounding "
                f"error exceeds 1e-3; normalise the features or raise the temperature"
            ),
        ),
        (
            (offsets[0] != 0) | (offsets[-1] != n),
            lambda: (
                f"segments must start at 0 and end at N={n}, got {int(offsets[0])} ... "
                f"{int(offsets[-1])}"
            ),
        ),
        ((offsets[1:] < offsets[:-1]).any(), lambda: "segments must be non-decreasing offsets"),
    ]
    if num_classes is not None:
        problems.append(
            (
                (valid & (labels >= num_classes)).any(),
                lambda: (
                    f"labels must be < num_classes={num_classes} (or ignore_index); found "
                    f"{int(labels[valid].max())}"
                ),
            )
        )
    return torch.stack([failed for failed, _ in problems]), [message for _, message in problems]


def validate_inputs(
    features, labels, temperature, segments, weighting, ignore_index, reduction, num_classes
) -> torch.Tensor:
    """Check every argument of ``supcon_loss``; returns the int64 segment offsets (S + 1,).

    The one place input checks live: both compiled backends and the reference rely on it. Under
    ``torch.compile`` the checks of values (labels, feature values and norms, segment offsets)
    cannot run here; ``supcon_loss`` then applies the compiled-call policy instead.
    """
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if features.dim() != 2:
        raise ValueError(f"features must have shape (N, D), got shape {tuple(features.shape)}")
    n, d = features.shape
    if d == 0:
        raise ValueError("features must have at least one column (D >= 1), got D = 0")
    allowed = _CUDA_DTYPES if features.device.type == "cuda" else _CPU_DTYPES
    if features.dtype not in allowed:
        names = ", ".join(str(t).replace("torch.", "") for t in allowed)
        raise TypeError(
            f"features dtype {features.dtype} is not supported on {features.device.type}; "
            f"use one of {names}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(
            f"labels must have shape (N,) = ({n},) to match features, got {tuple(labels.shape)}"
        )
    if labels.device != features.device:
        raise ValueError(
            f"labels are on {labels.device} but features are on {features.device}; "
            f"put both on the same device"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    largest_value = torch.finfo(accumulation_dtype(features.dtype)).max
    if 1 / temperature > largest_value:
        raise ValueError(
            f"temperature must be >= {1 / largest_value:.4g} so that 1 / temperature "
            f"is finite in {accumulation_dtype(features.dtype)}, got {temperature}"
        )
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if num_classes is not None and (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, numbers.Integral)
        or num_classes < 1
    ):
        raise ValueError(f"num_classes must be None or an int >= 1, got {num_classes!r}")
    offsets = _segment_offsets(segments, n, features.device)
    if not torch.compiler.is_compiling():
        failed, messages = _value_checks(
            features, labels, offsets, temperature, ignore_index, num_classes
        )
        for check_failed, message in zip(failed.tolist(), messages):
            if check_failed:
                raise ValueError(message())
    return offsets


def _segment_offsets(segments, n: int, device: torch.device) -> torch.Tensor:
    if segments is None:
        return torch.tensor([0, n], dtype=torch.int64, device=device)
    if not isinstance(segments, torch.Tensor):
        raise TypeError(f"segments must be None or a torch.Tensor, got {type(segments).__name__}")
    if segments.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"segments must be an int64 (or int32) tensor, got {segments.dtype}")
    if segments.dim() != 1 or segments.numel() < 2:
        raise ValueError(
            f"segments must be 1-D offsets [0, ..., N] of length S + 1 >= 2, "
            f"got shape {tuple(segments.shape)}"
        )
    return segments.to(device=device, dtype=torch.int64).contiguous()


def _compiled_call_poison(features, labels, offsets, temperature, ignore_index, num_classes):
    """NaN (0-dim, accumulation dtype) when any value check fails, else 1: the compiled-call
    policy multiplies the per-anchor losses by it, so that a bad input gives a NaN loss and,
    through the upstream gradient, a NaN gradient, never a plausible number."""
    failed, _ = _value_checks(features, labels, offsets, temperature, ignore_index, num_classes)
    one = torch.ones((), dtype=accumulation_dtype(features.dtype), device=features.device)
    return torch.where(failed.any(), torch.full_like(one, float("nan")), one)


def _in_range_offsets(offsets: torch.Tensor, n: int) -> torch.Tensor:
    """Offsets made valid (0 first, N last, non-decreasing), so that a kernel handed unchecked
    ones never indexes outside the rows; the result is poisoned anyway when they were not."""
    inner = offsets[1:-1].clamp(0, n).cummax(0).values
    return torch.cat([offsets.new_zeros(1), inner, offsets.new_full((1,), n)])


def supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 0.1,
    segments: torch.Tensor | None = None,
    weighting: str = "prevalence",
    ignore_index: int = -1,
    reduction: str = "mean",
    num_classes: int | None = None,
) -> torch.Tensor:
    """Pixel supervised contrastive loss, fused: never builds the N x N similarity matrix.

    For a valid anchor i with positives P(i) = {p != i : y_p = y_i} in its segment,
    ``s_ij = z_i . z_j / temperature`` and

        loss_i = log(sum_{j != i, valid} w_i(y_j) exp(s_ij)) - mean_{p in P(i)} s_ip

    with ``w_i(c) = 1 / (n_c - [c == y_i])`` for ``weighting="prevalence"`` (MCSC: every class
    contributes the mean of its exp-similarities; n_c counts the valid rows of class c in the
    segment) and ``w = 1`` for ``weighting="none"`` (SupCon, Khosla et al. 2020).

    Args:
        features: (N, D) float32/float64 on CPU; float32/float16/bfloat16 (or float64) on CUDA.
            Used as given (normalise them yourself). Gradient flows to it.
        labels: (N,) int64 or int32, values in [0, C) or ``ignore_index``.
        temperature: float > 0.
        segments: None (all rows in one set) or (S + 1,) int64 offsets ``0 = o_0 <= ... <=
            o_S = N`` ("cu_seqlens"); rows only interact within ``[o_k, o_{k+1})``.
        weighting: "prevalence" or "none".
        ignore_index: rows with this label are neither anchors nor contrasts.
        reduction: "mean" (over anchors that have a positive; 0 when there is none), "sum", or
            "none" (the (N,) per-anchor losses, 0 for rows that are not anchors).
        num_classes: accepted for API compatibility with callers that know C; the kernels need
            only the labels, so it is used to check them.

    Returns:
        A scalar (or (N,) for ``reduction="none"``) of ``features.dtype``.

    Raises:
        TypeError, ValueError: naming the argument, for bad types, shapes, devices, options,
            labels, non-finite features, features past ``similarity_limit`` or bad segments.
            Under ``torch.compile`` the checks of values cannot run in Python: the CPU kernel
            raises them itself (as ValueError), and wherever a kernel cannot (CUDA, and
            ``num_classes`` everywhere) the loss and its gradient become NaN instead.
    """
    offsets = validate_inputs(
        features, labels, temperature, segments, weighting, ignore_index, reduction, num_classes
    )
    prevalence = weighting == "prevalence"
    compiling = torch.compiler.is_compiling()
    if compiling:
        poison = _compiled_call_poison(
            features, labels, offsets, temperature, ignore_index, num_classes
        )
        if features.device.type != "cpu":
            # The CPU kernel checks the offsets itself and raises; other kernels may not.
            offsets = _in_range_offsets(offsets, features.shape[0])
    if _has_kernel(features.device.type):
        per_anchor, _, positives = torch.ops.mcsc.supcon_forward(
            features, labels, offsets, float(temperature), prevalence, int(ignore_index)
        )
    else:
        per_anchor, positives = reference.supcon_per_anchor_reference(
            features, labels, offsets, float(temperature), prevalence, int(ignore_index)
        )
    if compiling:
        per_anchor = (per_anchor * poison).to(features.dtype)
    if reduction == "none":
        return per_anchor
    # Summed in the accumulation dtype: float16 sums of N losses overflow long before N does.
    total = per_anchor.sum(dtype=accumulation_dtype(features.dtype))
    if reduction == "sum":
        return total.to(features.dtype)
    num_anchors = (positives > 0).sum().clamp(min=1)
    return (total / num_anchors).to(features.dtype)


def _setup_context(ctx, inputs, output):
    features, labels, segments, temperature, prevalence, _ = inputs
    _, lse, positives = output
    ctx.save_for_backward(features, labels, segments, lse, positives)
    ctx.temperature = temperature
    ctx.prevalence = prevalence
    ctx.mark_non_differentiable(lse, positives)


def _backward(ctx, grad_loss, grad_lse, grad_positives):
    features, labels, segments, lse, positives = ctx.saved_tensors
    grad_features = None
    if ctx.needs_input_grad[0]:
        grad_features = torch.ops.mcsc.supcon_backward(
            grad_loss.contiguous(),
            features,
            labels,
            segments,
            lse,
            positives,
            ctx.temperature,
            ctx.prevalence,
        )
    return grad_features, None, None, None, None, None


def _register_python_kernels() -> None:
    torch.library.register_autograd("mcsc::supcon_forward", _backward, setup_context=_setup_context)

    @torch.library.register_fake("mcsc::supcon_forward")
    def _forward_fake(features, labels, segments, temperature, prevalence, ignore_index):
        n = features.shape[0]
        loss = features.new_empty((n,))
        lse = features.new_empty((n,), dtype=accumulation_dtype(features.dtype))
        positives = features.new_empty((n,), dtype=torch.int32)
        return loss, lse, positives

    @torch.library.register_fake("mcsc::supcon_backward")
    def _backward_fake(
        grad_loss, features, labels, segments, lse, positives, temperature, prevalence
    ):
        return torch.empty_like(features)


if _EXTENSION_LOADED:
    _register_python_kernels()
