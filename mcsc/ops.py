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

import torch

from mcsc import reference

WEIGHTINGS = ("prevalence", "none")
_REDUCTIONS = ("mean", "sum", "none")
_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _load_extension() -> tuple[bool, str]:
    """Import the compiled library; returns (loaded, reason it is not)."""
    try:
        from mcsc import _C
    except (ImportError, OSError) as error:
        return False, (
            f"the compiled extension mcsc._C could not be loaded ({error}). It is probably "
            f"missing (install with `pip install --no-build-isolation .`) or was built for "
            f"another torch than the running {torch.__version__}"
        )
    built_with = _C.built_with_torch
    if built_with != torch.__version__:
        return False, (
            f"mcsc._C was compiled against torch {built_with} but torch {torch.__version__} "
            f"is running; reinstall mcsc with `pip install --no-build-isolation .`"
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


def validate_inputs(features, labels, temperature, segments, weighting, ignore_index, reduction,
                    num_classes) -> torch.Tensor:
    """Check every argument of ``supcon_loss``; returns the int64 segment offsets (S + 1,).

    The one place input checks live: both compiled backends and the reference rely on it.
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
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral)
        or num_classes < 1
    ):
        raise ValueError(f"num_classes must be None or an int >= 1, got {num_classes!r}")

    # Checks of values need the data; torch.compile traces without it, so they run in eager
    # mode only (a compiled graph is checked by running it eagerly once).
    if n > 0 and not torch.compiler.is_compiling():
        valid = labels[labels != ignore_index]
        if valid.numel() > 0:
            low, high = int(valid.min()), int(valid.max())
            if low < 0:
                raise ValueError(
                    f"labels must be in [0, C) or equal ignore_index={ignore_index}; found {low}"
                )
            if num_classes is not None and high >= num_classes:
                raise ValueError(
                    f"labels must be < num_classes={num_classes} (or ignore_index); found {high}"
                )
        if not bool(torch.isfinite(features).all()):
            raise ValueError("features contain NaN or infinite values")
    return _validate_segments(segments, n, features.device)


def _validate_segments(segments, n: int, device: torch.device) -> torch.Tensor:
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
    offsets = segments.to(device=device, dtype=torch.int64).contiguous()
    if torch.compiler.is_compiling():
        return offsets
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0 or last != n:
        raise ValueError(f"segments must start at 0 and end at N={n}, got {first} ... {last}")
    if bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError("segments must be non-decreasing offsets")
    return offsets


def _compact_sparse_labels(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, int]:
    """Renumber class ids to 0..C'-1 when they are sparse and large (e.g. 10**9).

    The kernels keep per-class state of size max(label) + 1, so huge ids are replaced by their
    rank among the ids present (ignored rows become -1); smaller ids are used as they are.
    Returns the labels and the ignore_index that goes with them.
    """
    if torch.compiler.is_compiling():
        return labels, ignore_index
    valid = labels != ignore_index
    if not bool(valid.any()) or int(labels[valid].max()) < max(labels.numel(), 65536):
        return labels, ignore_index
    _, ranks = torch.unique(labels[valid], return_inverse=True)
    compact = torch.full_like(labels, -1)
    compact[valid] = ranks.to(labels.dtype)
    return compact, -1


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, *, temperature: float = 0.1,
                segments: torch.Tensor | None = None, weighting: str = "prevalence",
                ignore_index: int = -1, reduction: str = "mean",
                num_classes: int | None = None) -> torch.Tensor:
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
    """
    offsets = validate_inputs(features, labels, temperature, segments, weighting, ignore_index,
                              reduction, num_classes)
    labels, ignore_index = _compact_sparse_labels(labels, ignore_index)
    prevalence = weighting == "prevalence"
    if _has_kernel(features.device.type):
        per_anchor, _, positives = torch.ops.mcsc.supcon_forward(
            features, labels, offsets, float(temperature), prevalence, int(ignore_index)
        )
    else:
        per_anchor, positives = reference.supcon_per_anchor_reference(
            features, labels, offsets, float(temperature), prevalence, int(ignore_index)
        )
    if reduction == "none":
        return per_anchor
    total = per_anchor.sum()
    if reduction == "sum":
        return total
    num_anchors = (positives > 0).sum().clamp(min=1)
    return total / num_anchors


def _setup_context(ctx, inputs, output):
    features, labels, segments, temperature, prevalence, ignore_index = inputs
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
            grad_loss.contiguous(), features, labels, segments, lse, positives,
            ctx.temperature, ctx.prevalence,
        )
    return grad_features, None, None, None, None, None


def _register_python_kernels() -> None:
    torch.library.register_autograd(
        "mcsc::supcon_forward", _backward, setup_context=_setup_context
    )

    @torch.library.register_fake("mcsc::supcon_forward")
    def _forward_fake(features, labels, segments, temperature, prevalence, ignore_index):
        n = features.shape[0]
        loss = features.new_empty((n,))
        lse = features.new_empty((n,), dtype=torch.float32 if features.dtype != torch.float64
                                 else torch.float64)
        positives = features.new_empty((n,), dtype=torch.int32)
        return loss, lse, positives

    @torch.library.register_fake("mcsc::supcon_backward")
    def _backward_fake(grad_loss, features, labels, segments, lse, positives, temperature,
                       prevalence):
        return torch.empty_like(features)


if _EXTENSION_LOADED:
    _register_python_kernels()
