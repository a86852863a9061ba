"""Before timing: every implementation's loss and gradient against ``fused`` on small inputs."""

from __future__ import annotations

import implementations as impls
import torch
from timing import TEMPERATURE, error_summary

# (title, segment sizes, classes, weighting, fraction of ignored rows)
CASES = [
    ("prevalence, 3 segments, ignored rows", [300, 0, 211, 97], 4, "prevalence", 0.1),
    ("none, 3 segments, ignored rows", [300, 211, 97], 5, "none", 0.1),
    ("none, 1 segment", [512], 4, "none", 0.0),
    ("prevalence, 1 segment, C=14", [640], 14, "prevalence", 0.0),
]
# torch.compile compiles anew for every shape: each compiled peer is checked on the cases that
# reach all of its code with the fewest compilations (compiled runs one function per segment;
# flex sees segments, ignored rows and the weights at once)
COMPILED_CASES = {
    "compiled": ("none, 1 segment", "prevalence, 1 segment, C=14"),
    "flex": ("prevalence, 3 segments, ignored rows",),
}


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 2e-4, torch.float64: 1e-9}.get(dtype, 3e-2)


def loss_and_gradient(name, z0, y, bounds, weighting):
    z = z0.clone().requires_grad_(True)
    loss = impls.IMPLEMENTATIONS[name](z, y, bounds, TEMPERATURE, weighting)
    loss.backward()
    return loss.detach(), z.grad.detach()


def check_agreement(
    device: str, impl_names, dtype_name: str = "float32"
) -> tuple[list[str], dict[str, str], bool]:
    """Loss and gradient of every implementation against ``fused``.

    Returns the report lines, the implementations not to time with the reason (one that
    disagrees; a compiled peer that does not run), and whether one disagrees. Implementations
    that cannot run on ``device`` get a line saying so; any other error propagates.
    """
    lines, rejected, disagrees = [], {}, False
    dtype = getattr(torch, dtype_name)
    tol = tolerance(dtype)
    names = [name for name in impl_names if name not in ("fused", "gemm")]
    for name in names:
        if impls.unavailable(name, device):
            lines.append(f"  {name}: {impls.unavailable(name, device)}; not checked")
    names = [name for name in names if not impls.unavailable(name, device)]
    for title, sizes, classes, weighting, ignore in CASES:
        bounds = impls.segment_bounds(sizes)
        z0, y = impls.make_inputs(
            sum(sizes), 32, classes, seed=7, dtype=dtype, device=device, ignore_fraction=ignore
        )
        reference_loss, reference_grad = loss_and_gradient("fused", z0, y, bounds, weighting)
        for name in names:
            if name in rejected or not impls.supports(name, weighting, ignore > 0):
                continue
            if name in COMPILED_CASES and title not in COMPILED_CASES[name]:
                continue
            try:
                loss, grad = loss_and_gradient(name, z0, y, bounds, weighting)
            except Exception as error:
                if name not in impls.COMPILED_IMPLS:
                    raise
                rejected[name] = f"does not run ({error_summary(error, 120)})"
                lines.append(f"  {name}: {rejected[name]}; not timed")
                continue
            expected_grad = reference_grad
            if name == "pml":  # pml normalises inside: compare on the sphere's tangent space
                expected_grad = reference_grad - (reference_grad * z0).sum(1, keepdim=True) * z0
            loss_err = abs(float(loss) - float(reference_loss)) / max(
                abs(float(reference_loss)), 1e-12
            )
            grad_err = float(
                (grad - expected_grad).abs().max() / expected_grad.abs().max().clamp(min=1e-30)
            )
            ok = loss_err <= tol and grad_err <= tol
            lines.append(
                f"  {title:38s} {name:9s} loss rel err {loss_err:.1e}  "
                f"grad max rel err {grad_err:.1e}  {'ok' if ok else 'MISMATCH'}"
            )
            if not ok:
                rejected[name] = (
                    f"disagrees with fused on '{title}': loss rel err "
                    f"{loss_err:.2e}, grad rel err {grad_err:.2e} (tol {tol})"
                )
                disagrees = True
    return lines, rejected, disagrees
