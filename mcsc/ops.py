"""The fused supervised contrastive loss: public function, input checks and op registration.

The compiled extension (``mcsc._C``) defines two operators in the ``mcsc`` namespace:

* ``mcsc::supcon_forward(features, labels, segments, temperature, prevalence, ignore_index,
  ref_features=None, ref_labels=None, ref_segments=None, ref_self_index=None,
  anchor_gradient=False)`` returns the per-anchor loss (M,), the log-denominator ``lse`` (M,),
  the number of positives (M,) int32 (-1 for ignored rows) and, with a reference set and
  ``anchor_gradient``, d loss_i / d features_i (M, D) (else an empty (0, D));
* ``mcsc::supcon_backward(grad_loss, features, labels, segments, lse, positives, temperature,
  prevalence, ignore_index=-1, ref_features=None, ...)`` returns the gradient with respect to
  the contrast rows: ``features`` without a reference set, ``ref_features`` with one.

The single-set call is the two-set call with the anchors as their own reference set and each
row's own pair excluded; the kernels run it with one schedule that uses s_ij = s_ji.

Autograd and fake (meta) kernels are registered here with ``torch.library`` so the op works with
``torch.compile``. When the extension cannot be loaded, ``supcon_loss`` falls back to the dense
reference in ``mcsc.reference`` after one warning; :func:`backend` says which path runs.
"""

from __future__ import annotations

import math
import numbers
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from mcsc import reference

WEIGHTINGS = ("prevalence", "none")
_REDUCTIONS = ("mean", "sum", "none")
_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The kernels index rows with int32.
_MAX_ROWS = 2**31 - 1


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


def _largest_norm(rows: torch.Tensor) -> torch.Tensor:
    """max_i |z_i| as a 0-dim float64 tensor (0 for no rows, inf where a norm overflows)."""
    if rows.shape[0] == 0:
        return torch.zeros((), dtype=torch.float64, device=rows.device)
    return torch.linalg.vector_norm(rows, dim=1).amax().double()


def _largest_similarity(
    features: torch.Tensor, temperature: float, ref_features: torch.Tensor | None = None
) -> torch.Tensor:
    """The bound max_i |z_i| max_j |k_j| / temperature of every s_ij (k = the reference rows,
    or the features themselves) as a 0-dim float64 tensor (inf where a norm overflows)."""
    largest = _largest_norm(features)
    other = largest if ref_features is None else _largest_norm(ref_features)
    return largest * other / temperature


def _not_finite(rows: torch.Tensor) -> torch.Tensor:
    """True (0-dim bool) when ``rows`` hold a NaN or an infinity. amin and amax propagate NaN,
    so two reductions decide it without the (N, D) bool temporary of isfinite(rows).all()
    (32 MiB for a 65536 x 128 reference set)."""
    if rows.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=rows.device)
    low, high = torch.aminmax(rows)
    return ~(torch.isfinite(low) & torch.isfinite(high))


def _value_checks(features, labels, offsets, temperature, ignore_index, num_classes, ref=None):
    """The checks that need the data: a (K,) bool tensor, True where check k fails, and the K
    functions that write each check's message. Eager calls read the flags with one device sync
    and raise on the first that fails; compiled calls, which cannot branch on data, poison the
    result with their any() (see supcon_loss)."""
    n = features.shape[0]
    valid = labels != ignore_index
    limit = similarity_limit(features.dtype)
    largest = _largest_similarity(features, temperature, None if ref is None else ref.features)
    similarity_name = (
        "max_i |z_i|^2 / temperature"
        if ref is None
        else "max_i |features_i| max_j |ref_features_j| / temperature"
    )
    problems = [
        (
            (valid & (labels < 0)).any(),
            lambda: (
                f"labels must be in [0, C) or equal ignore_index={ignore_index}; found "
                f"{int(labels[valid].min())}"
            ),
        ),
        (_not_finite(features), lambda: "features contain NaN or infinite values"),
        *(
            []
            if ref is None
            else [
                (
                    _not_finite(ref.features),
                    lambda: "ref_features contain NaN or infinite values",
                )
            ]
        ),
        (
            largest > limit,
            lambda: (
                f"features are too large: {similarity_name} = {float(largest):.4g} "
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
    if ref is not None:
        problems += _reference_value_checks(labels, offsets, ignore_index, ref)
    if num_classes is not None:
        checked = labels if ref is None else torch.cat([labels, ref.labels])
        valid = checked != ignore_index
        problems.append(
            (
                (valid & (checked >= num_classes)).any(),
                lambda: (
                    f"labels must be < num_classes={num_classes} (or ignore_index); found "
                    f"{int(checked[valid].max())}"
                ),
            )
        )
    return torch.stack([failed for failed, _ in problems]), [message for _, message in problems]


class ReferenceSet(NamedTuple):
    """The checked reference set of a two-set call."""

    features: torch.Tensor  # (K, D), the features' dtype and device
    labels: torch.Tensor  # (K,) int64 or int32
    offsets: torch.Tensor  # (S + 1,) int64, one reference segment per anchor segment
    self_index: torch.Tensor | None  # (M,) int64: each anchor's own reference row, or -1


def _reference_value_checks(labels, offsets, ignore_index, ref: ReferenceSet):
    """The value checks of a reference set, as (failed, message) pairs for _value_checks."""
    k = ref.features.shape[0]
    ref_valid = ref.labels != ignore_index
    problems = [
        (
            (ref_valid & (ref.labels < 0)).any(),
            lambda: (
                f"ref_labels must be in [0, C) or equal ignore_index={ignore_index}; found "
                f"{int(ref.labels[ref_valid].min())}"
            ),
        ),
        (
            (ref.offsets[0] != 0) | (ref.offsets[-1] != k),
            lambda: (
                f"ref_segments must start at 0 and end at K={k}, got {int(ref.offsets[0])} ... "
                f"{int(ref.offsets[-1])}"
            ),
        ),
        (
            (ref.offsets[1:] < ref.offsets[:-1]).any(),
            lambda: "ref_segments must be non-decreasing offsets",
        ),
    ]
    if ref.self_index is None:
        return problems
    index = ref.self_index
    marked = index >= 0
    # the reference segment each anchor belongs to, and that segment's row range
    anchor_segment = (
        torch.searchsorted(offsets, torch.arange(labels.shape[0], device=labels.device), right=True)
        - 1
    ).clamp(0, offsets.shape[0] - 2)
    low, high = ref.offsets[anchor_segment], ref.offsets[anchor_segment + 1]
    safe = index.clamp(0, max(k - 1, 0))
    outside = marked & ((index < low) | (index >= high))
    own_label = ref.labels[safe] if k > 0 else labels
    problems += [
        (
            (index < -1).any() | (index >= k).any(),
            lambda: f"ref_self_index must be -1 or a row of ref_features in [0, {k})",
        ),
        (
            outside.any(),
            lambda: (
                "ref_self_index must name a reference row of the anchor's own segment; anchor "
                f"{int(outside.nonzero()[0])} names row {int(index[outside][0])}"
            ),
        ),
        (
            (marked & ~outside & (own_label != labels)).any(),
            lambda: (
                "ref_self_index must name reference rows with the anchor's own label "
                "(the anchor's copy in the reference set)"
            ),
        ),
    ]
    return problems


def _check_reference(
    features, labels, segments, ref_features, ref_labels, ref_segments, ref_self_index
) -> ReferenceSet | None:
    """Checks of the reference set's types, shapes, dtypes and devices (not of its values)."""
    if ref_features is None:
        for name, value in (
            ("ref_labels", ref_labels),
            ("ref_segments", ref_segments),
            ("ref_self_index", ref_self_index),
        ):
            if value is not None:
                raise ValueError(f"{name} was given without ref_features")
        return None
    if not isinstance(ref_features, torch.Tensor):
        raise TypeError(
            f"ref_features must be None or a torch.Tensor, got {type(ref_features).__name__}"
        )
    if ref_labels is None:
        raise ValueError("ref_labels must be given with ref_features (one label per row)")
    if not isinstance(ref_labels, torch.Tensor):
        raise TypeError(f"ref_labels must be a torch.Tensor, got {type(ref_labels).__name__}")
    d = features.shape[1]
    if ref_features.dim() != 2 or ref_features.shape[1] != d:
        raise ValueError(
            f"ref_features must have shape (K, D) with D = {d} like features, got shape "
            f"{tuple(ref_features.shape)}"
        )
    if ref_features.dtype != features.dtype:
        raise TypeError(
            f"ref_features must have the features' dtype {features.dtype}, got {ref_features.dtype}"
        )
    if ref_features.device != features.device:
        raise ValueError(
            f"ref_features are on {ref_features.device} but features are on {features.device}; "
            f"put both on the same device"
        )
    k = ref_features.shape[0]
    if k > _MAX_ROWS:
        raise ValueError(f"ref_features may have at most {_MAX_ROWS} rows, got {k}")
    if ref_labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ref_labels must be int64 or int32, got {ref_labels.dtype}")
    if ref_labels.dim() != 1 or ref_labels.shape[0] != k:
        raise ValueError(
            f"ref_labels must have shape (K,) = ({k},) to match ref_features, got "
            f"{tuple(ref_labels.shape)}"
        )
    if ref_labels.device != features.device:
        raise ValueError(
            f"ref_labels are on {ref_labels.device} but features are on {features.device}"
        )
    if (segments is None) != (ref_segments is None):
        raise ValueError(
            "segments and ref_segments go together: give both (anchor segment k contrasts "
            "against reference segment k) or neither"
        )
    offsets = _segment_offsets(ref_segments, k, features.device, name="ref_segments")
    if segments is not None and offsets.shape[0] != segments.shape[0]:
        raise ValueError(
            f"ref_segments must have one offset per offset of segments ({segments.shape[0]}), "
            f"got {offsets.shape[0]}"
        )
    self_index = None
    if ref_self_index is not None:
        if not isinstance(ref_self_index, torch.Tensor):
            raise TypeError(
                f"ref_self_index must be None or a torch.Tensor, got "
                f"{type(ref_self_index).__name__}"
            )
        if ref_self_index.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ref_self_index must be int64 or int32, got {ref_self_index.dtype}")
        if ref_self_index.shape != labels.shape:
            raise ValueError(
                f"ref_self_index must have shape (M,) = ({labels.shape[0]},), one entry per "
                f"anchor, got {tuple(ref_self_index.shape)}"
            )
        if ref_self_index.device != features.device:
            raise ValueError(
                f"ref_self_index is on {ref_self_index.device} but features are on "
                f"{features.device}"
            )
        self_index = ref_self_index.to(torch.int64).contiguous()
    return ReferenceSet(ref_features, ref_labels, offsets, self_index)


def validate_inputs(
    features,
    labels,
    temperature,
    segments,
    weighting,
    ignore_index,
    reduction,
    num_classes,
    ref_features=None,
    ref_labels=None,
    ref_segments=None,
    ref_self_index=None,
) -> tuple[torch.Tensor, ReferenceSet | None]:
    """Check every argument of ``supcon_loss``; returns the int64 segment offsets (S + 1,) and
    the checked reference set (None without one).

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
    if n > _MAX_ROWS:
        raise ValueError(f"features may have at most {_MAX_ROWS} rows, got {n}")
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
    ref = _check_reference(
        features, labels, segments, ref_features, ref_labels, ref_segments, ref_self_index
    )
    if not torch.compiler.is_compiling():
        failed, messages = _value_checks(
            features, labels, offsets, temperature, ignore_index, num_classes, ref
        )
        for check_failed, message in zip(failed.tolist(), messages):
            if check_failed:
                raise ValueError(message())
    return offsets, ref


def _segment_offsets(
    segments, n: int, device: torch.device, name: str = "segments"
) -> torch.Tensor:
    if segments is None:
        return torch.tensor([0, n], dtype=torch.int64, device=device)
    if not isinstance(segments, torch.Tensor):
        raise TypeError(f"{name} must be None or a torch.Tensor, got {type(segments).__name__}")
    if segments.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 (or int32) tensor, got {segments.dtype}")
    if segments.dim() != 1 or segments.numel() < 2:
        raise ValueError(
            f"{name} must be 1-D offsets [0, ..., N] of length S + 1 >= 2, "
            f"got shape {tuple(segments.shape)}"
        )
    return segments.to(device=device, dtype=torch.int64).contiguous()


def _compiled_call_poison(features, labels, offsets, temperature, ignore_index, num_classes, ref):
    """NaN (0-dim, accumulation dtype) when any value check fails, else 1: the compiled-call
    policy multiplies the per-anchor losses by it, so that a bad input gives a NaN loss and,
    through the upstream gradient, a NaN gradient, never a plausible number."""
    failed, _ = _value_checks(
        features, labels, offsets, temperature, ignore_index, num_classes, ref
    )
    one = torch.ones((), dtype=accumulation_dtype(features.dtype), device=features.device)
    return torch.where(failed.any(), torch.full_like(one, float("nan")), one)


def _in_range_offsets(offsets: torch.Tensor, n: int) -> torch.Tensor:
    """Offsets made valid (0 first, N last, non-decreasing), so that a kernel handed unchecked
    ones never indexes outside the rows; the result is poisoned anyway when they were not."""
    inner = offsets[1:-1].clamp(0, n).cummax(0).values
    return torch.cat([offsets.new_zeros(1), inner, offsets.new_full((1,), n)])


def _in_range_reference(ref: ReferenceSet | None) -> ReferenceSet | None:
    """The reference set with offsets and self indices made valid (see _in_range_offsets)."""
    if ref is None:
        return None
    k = ref.features.shape[0]
    self_index = ref.self_index
    if self_index is not None:
        self_index = torch.where((self_index >= -1) & (self_index < k), self_index, -1)
    return ref._replace(offsets=_in_range_offsets(ref.offsets, k), self_index=self_index)


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
    ref_features: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    ref_segments: torch.Tensor | None = None,
    ref_self_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pixel supervised contrastive loss, fused: never builds the anchors x contrasts matrix.

    For a valid anchor i with contrasts C(i) and positives P(i) = {p in C(i) : y_p = y_i},
    ``s_ij = z_i . k_j / temperature`` and

        loss_i = log(sum_{j in C(i)} w_i(y_j) exp(s_ij)) - mean_{p in P(i)} s_ip

    with ``w_i(c) = 1 / |{j in C(i) : y_j = c}|`` for ``weighting="prevalence"`` (MCSC: every
    class contributes the mean of its exp-similarities) and ``w = 1`` for ``weighting="none"``
    (SupCon, Khosla et al. 2020).

    * One set (no ``ref_features``): the rows of ``features`` are the anchors and the contrasts,
      ``k = z``; C(i) holds the valid rows of i's segment except i itself, so
      ``w_i(c) = 1 / (n_c - [c == y_i])`` with n_c the valid rows of class c in the segment.
    * A reference set (``ref_features``, ``ref_labels``; e.g. a cross-batch memory): anchor i of
      segment k contrasts against the valid reference rows of reference segment k, minus the row
      ``ref_self_index[i]`` when that is >= 0 (the anchor's own copy, which then is no positive
      of its own). Anchors are not contrasted with each other. Memory stays O((M + K) D).

    Args:
        features: (M, D) anchors; float32/float64 on CPU; float32/float16/bfloat16 (or float64)
            on CUDA. Used as given (normalise them yourself). Gradient flows to it.
        labels: (M,) int64 or int32, values in [0, C) or ``ignore_index``.
        temperature: float > 0.
        segments: None (all rows in one set) or (S + 1,) int64 offsets ``0 = o_0 <= ... <=
            o_S = M`` ("cu_seqlens"); rows only interact within ``[o_k, o_{k+1})``.
        weighting: "prevalence" or "none".
        ignore_index: rows with this label (anchors or reference rows) take no part.
        reduction: "mean" (over anchors that have a positive; 0 when there is none), "sum", or
            "none" (the (M,) per-anchor losses, 0 for rows that are not anchors).
        num_classes: accepted for API compatibility with callers that know C; the kernels need
            only the labels, so it is used to check them.
        ref_features: None, or (K, D) reference rows of the features' dtype and device. Gradient
            flows to it when it requires grad.
        ref_labels: (K,) int64 or int32, required with ``ref_features``.
        ref_segments: with ``segments``, (S + 1,) int64 offsets ``0 = r_0 <= ... <= r_S = K``:
            anchor segment k contrasts against reference rows ``[r_k, r_{k+1})``. Give both or
            neither.
        ref_self_index: None, or (M,) int64/int32: for each anchor the reference row that holds
            the anchor itself (same label, same segment), excluded from its contrasts, or -1.

    Returns:
        A scalar (or (M,) for ``reduction="none"``) of ``features.dtype``.

    Raises:
        TypeError, ValueError: naming the argument, for bad types, shapes, dtypes, devices,
            options, labels, non-finite features, features past ``similarity_limit`` (the bound
            ``max |z_i| max |k_j| / temperature`` of every similarity) or bad segments.
            Under ``torch.compile`` the checks of values cannot run in Python: the CPU kernel
            raises them itself (as ValueError), and wherever a kernel cannot (CUDA, and
            ``num_classes`` everywhere) the loss and its gradient become NaN instead.
    """
    offsets, ref = validate_inputs(
        features,
        labels,
        temperature,
        segments,
        weighting,
        ignore_index,
        reduction,
        num_classes,
        ref_features,
        ref_labels,
        ref_segments,
        ref_self_index,
    )
    prevalence = weighting == "prevalence"
    compiling = torch.compiler.is_compiling()
    if compiling:
        poison = _compiled_call_poison(
            features, labels, offsets, temperature, ignore_index, num_classes, ref
        )
        if features.device.type != "cpu":
            # The CPU kernel checks offsets and indices itself and raises; other kernels may not.
            offsets = _in_range_offsets(offsets, features.shape[0])
            ref = _in_range_reference(ref)
    reference_args = () if ref is None else tuple(ref)
    if _has_kernel(features.device.type):
        # With a reference set, the anchors' gradient is computed by the forward's pass over the
        # pairs when it will be needed.
        anchor_gradient = ref is not None and features.requires_grad and torch.is_grad_enabled()
        per_anchor, _, positives, _ = torch.ops.mcsc.supcon_forward(
            features,
            labels,
            offsets,
            float(temperature),
            prevalence,
            int(ignore_index),
            *reference_args,
            anchor_gradient=anchor_gradient,
        )
    else:
        per_anchor, positives = reference.supcon_per_anchor_reference(
            features,
            labels,
            offsets,
            float(temperature),
            prevalence,
            int(ignore_index),
            *reference_args,
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


# Positions of the forward's inputs, as torch.library passes them to the autograd functions.
_FEATURES, _REF_FEATURES = 0, 6


def _setup_context(ctx, inputs, output):
    features, labels, segments, temperature, prevalence, ignore_index = inputs[:6]
    # ref_features, ref_labels, ref_segments, ref_self_index: None when not passed
    reference = (list(inputs[6:10]) + [None] * 4)[:4]
    _, lse, positives, anchor_grad = output
    ctx.save_for_backward(features, labels, segments, lse, positives, anchor_grad, *reference)
    ctx.options = temperature, prevalence, ignore_index
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(lse, positives, anchor_grad)


def _backward(ctx, grad_loss, grad_lse, grad_positives, grad_anchor_grad):
    features, labels, segments, lse, positives, anchor_grad, *reference = ctx.saved_tensors
    temperature, prevalence, ignore_index = ctx.options
    grads = [None] * ctx.num_inputs
    two_sets = reference[0] is not None
    reference_args = tuple(reference) if two_sets else ()
    if two_sets and ctx.needs_input_grad[_FEATURES]:
        # each anchor's loss depends on its own row alone: its gradient, kept by the forward,
        # scaled by the upstream gradient
        if anchor_grad.shape[0] != features.shape[0]:
            raise RuntimeError(
                "mcsc::supcon_forward was called with anchor_gradient=False, so the gradient "
                "of its anchors was not kept; call it with anchor_gradient=True"
            )
        scale = grad_loss.to(anchor_grad.dtype).unsqueeze(1)
        grads[_FEATURES] = (scale * anchor_grad).to(features.dtype)
    # the contrast rows' gradient: the features' (both roles) or the reference rows'
    contrasts = _REF_FEATURES if two_sets else _FEATURES
    if ctx.needs_input_grad[contrasts]:
        grads[contrasts] = torch.ops.mcsc.supcon_backward(
            grad_loss.contiguous(),
            features,
            labels,
            segments,
            lse,
            positives,
            temperature,
            prevalence,
            ignore_index,
            *reference_args,
        )
    return tuple(grads)


def _register_python_kernels() -> None:
    torch.library.register_autograd("mcsc::supcon_forward", _backward, setup_context=_setup_context)

    @torch.library.register_fake("mcsc::supcon_forward")
    def _forward_fake(
        features,
        labels,
        segments,
        temperature,
        prevalence,
        ignore_index,
        ref_features=None,
        ref_labels=None,
        ref_segments=None,
        ref_self_index=None,
        anchor_gradient=False,
    ):
        m, d = features.shape
        accumulation = accumulation_dtype(features.dtype)
        loss = features.new_empty((m,))
        lse = features.new_empty((m,), dtype=accumulation)
        positives = features.new_empty((m,), dtype=torch.int32)
        kept = m if anchor_gradient and ref_features is not None else 0
        anchor_grad = features.new_empty((kept, d), dtype=accumulation)
        return loss, lse, positives, anchor_grad

    @torch.library.register_fake("mcsc::supcon_backward")
    def _backward_fake(
        grad_loss,
        features,
        labels,
        segments,
        lse,
        positives,
        temperature,
        prevalence,
        ignore_index=-1,
        ref_features=None,
        ref_labels=None,
        ref_segments=None,
        ref_self_index=None,
    ):
        return torch.empty_like(features if ref_features is None else ref_features)


if _EXTENSION_LOADED:
    _register_python_kernels()
