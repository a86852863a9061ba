"""The reusable losses: SupConLoss, PixelContrastiveLoss, label resizing, and a light ``import mcsc``."""

import math
import pydoc
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import mcsc
from mcsc.losses import (
    MultiScaleContrastiveLoss,
    PixelContrastiveLoss,
    SupConLoss,
    resize_labels,
)
from mcsc.reference import supcon_per_anchor_reference

ROOT = Path(__file__).resolve().parents[1]


def dense_supcon(z, y, temperature, ignore_index=-1):
    """Plain SupCon (weighting "none") in float64, mean over anchors with a positive."""
    valid = y != ignore_index
    z, y = z[valid].double(), y[valid]
    s = z @ z.T / temperature
    off = ~torch.eye(len(y), dtype=torch.bool)
    positives = (y[:, None] == y[None, :]) & off
    count = positives.sum(1)
    per_row = torch.logsumexp(s.masked_fill(~off, -math.inf), 1) - (s * positives).sum(
        1
    ) / count.clamp(min=1)
    return per_row[count > 0].mean()


# ------------------------------------------------------------------------------ SupConLoss
def test_supcon_module_equals_pytorch_metric_learning():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    g = torch.Generator().manual_seed(0)
    for n, d, classes, temperature in ((64, 16, 4, 0.1), (200, 8, 7, 0.5), (33, 3, 2, 0.07)):
        embeddings = torch.randn(n, d, generator=g, dtype=torch.float64) * 3
        labels = torch.randint(0, classes, (n,), generator=g)
        ours_input = embeddings.clone().requires_grad_()
        theirs_input = embeddings.clone().requires_grad_()
        ours = SupConLoss(temperature=temperature, weighting="none")(ours_input, labels)
        theirs = pml.SupConLoss(temperature=temperature)(theirs_input, labels)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-8)
        ours.backward()
        theirs.backward()
        torch.testing.assert_close(ours_input.grad, theirs_input.grad, rtol=1e-5, atol=1e-9)


def test_supcon_module_arguments():
    g = torch.Generator().manual_seed(1)
    embeddings = torch.randn(40, 6, generator=g)
    labels = torch.randint(0, 3, (40,), generator=g)
    labels[:5] = -1
    segments = torch.tensor([0, 15, 40])
    unit = F.normalize(embeddings, dim=1)
    # normalize=False uses the rows as given: equal on unit rows, different on raw ones
    raw = SupConLoss(normalize=False)
    torch.testing.assert_close(raw(unit, labels), SupConLoss()(embeddings, labels))
    assert raw(embeddings, labels).item() != pytest.approx(raw(unit, labels).item(), rel=1e-3)
    # prevalence weighting, segments and per-row reduction are the op's
    per_row = SupConLoss(reduction="none", temperature=0.2)(embeddings, labels, segments)
    expected, _ = supcon_per_anchor_reference(unit, labels, segments, 0.2, True, -1)
    torch.testing.assert_close(per_row, expected)
    assert per_row[:5].abs().sum() == 0  # ignored rows
    torch.testing.assert_close(
        SupConLoss(reduction="sum", temperature=0.2)(embeddings, labels, segments), expected.sum()
    )
    for bad, match in (
        ({"temperature": 0}, "temperature"),
        ({"weighting": "balanced"}, "weighting"),
        ({"reduction": "max"}, "reduction"),
        ({"ignore_index": 1.5}, "ignore_index"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            SupConLoss(**bad)
    with pytest.raises(ValueError, match="features"):
        SupConLoss()(embeddings[None], labels)


# --------------------------------------------------------------------------- label resizing
@pytest.mark.parametrize(
    "shape, size",
    [
        ((224, 224), (28, 28)),
        ((36, 36), (12, 12)),
        ((10, 10), (5, 5)),
        ((30, 45), (8, 13)),
        ((64, 64), (28, 28)),
        ((256, 256), (32, 32)),
        ((28, 28), (224, 224)),
        ((7, 9), (1, 4)),
        ((100, 7), (7, 100)),
    ],
)
def test_resize_labels_equals_scipy_zoom_order_0(shape, size):
    labels = torch.randint(
        1, 1000, (3,) + shape, generator=torch.Generator().manual_seed(sum(shape))
    )
    factors = (1, size[0] / shape[0], size[1] / shape[1])
    resized = resize_labels(labels, size)
    # the same pixel for every output pixel; scipy's default mode="constant" also writes its
    # cval 0 into the last row or column when rounding puts that coordinate a hair past the
    # edge (30 -> 8, 64 -> 28, 256 -> 32), which mode="nearest" does not and neither do we
    assert torch.equal(
        resized, torch.from_numpy(ndimage.zoom(labels.numpy(), factors, order=0, mode="nearest"))
    )
    published = torch.from_numpy(ndimage.zoom(labels.numpy(), factors, order=0))
    assert published.shape[1:] == size
    if shape == (224, 224):  # the method's coarse labels, exactly as the public code makes them
        assert torch.equal(resized, published)
    differs = resized != published
    assert bool((published[differs] == 0).all())


def test_resize_labels_is_not_every_eighth_pixel():
    labels = torch.arange(224)[None, None, :].expand(1, 224, 224)
    assert resize_labels(labels, (28, 28))[0, 0, :5].tolist() == [0, 8, 17, 25, 33]
    assert resize_labels(labels, (224, 224)) is labels


# ---------------------------------------------------------------------- PixelContrastiveLoss
def make_maps(seed=0, batch=3, dim=8, sizes=(24, 8), size=24, classes=3):
    g = torch.Generator().manual_seed(seed)
    maps = [
        F.normalize(torch.randn(batch, dim, s, s, generator=g), dim=1).requires_grad_()
        for s in sizes
    ]
    labels = torch.randint(0, classes, (batch, size, size), generator=g)
    return maps, labels


def test_all_sampler_is_plain_supcon_over_every_pixel_of_every_scale():
    maps, labels = make_maps()
    labels[0, :4] = -1
    criterion = PixelContrastiveLoss(sampler="all", weighting="none", temperature=(0.1, 0.3))
    loss = criterion(maps, labels)
    expected = []
    for embedding, temperature in zip(maps, (0.1, 0.3)):
        scale_labels = resize_labels(labels, embedding.shape[2:]).reshape(-1)
        rows = embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])
        expected.append(dense_supcon(rows.detach(), scale_labels, temperature))
    torch.testing.assert_close(loss.double(), sum(expected), rtol=1e-5, atol=1e-6)
    diagnostics = criterion.diagnostics
    assert diagnostics.loss_per_scale.tolist() == pytest.approx(
        [float(e) for e in expected], rel=1e-5
    )
    assert diagnostics.ignored.tolist() == [4 * 24, int((resize_labels(labels, (8, 8)) < 0).sum())]
    assert diagnostics.rows == 3 * (24 * 24 + 8 * 8) - int(diagnostics.ignored.sum())
    loss.backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in maps)


def test_one_map_equals_the_cross_loss_of_one_network():
    """MultiScaleContrastiveLoss is the pixel loss on the pooled maps of both networks."""
    maps, labels = make_maps(seed=3, batch=2)
    swin = [F.normalize(torch.randn_like(m), dim=1) for m in maps]
    logits = torch.zeros(2, 3, 24, 24)
    for sampler in ("blocks", "balanced", "all"):
        settings = {"sampler": sampler, "block_sizes": (6, 2), "pixels_per_class": 9, "seed": 4}
        cross = MultiScaleContrastiveLoss(**settings)(
            maps, swin, labels, logits, logits, labelled_count=2
        )
        pooled = [torch.cat([m, s]) for m, s in zip(maps, swin)]
        single = PixelContrastiveLoss(**settings)(pooled, torch.cat([labels, labels]))
        torch.testing.assert_close(cross, single)


def test_blocks_sampler_on_one_map_and_ignore_index():
    maps, labels = make_maps(seed=5, batch=2, sizes=(24,))
    labels[:, 6:12] = 255
    criterion = PixelContrastiveLoss(
        sampler="blocks", block_sizes=6, shuffle_blocks=False, ignore_index=255
    )
    loss = criterion(maps[0], labels)
    # 24 // 6 - 1 = 3 blocks per side; the block row y = 6..11 holds only ignored pixels
    groups = []
    for i in range(3):
        for j in range(3):
            z = (
                maps[0][:, :, i * 6 : (i + 1) * 6, j * 6 : (j + 1) * 6]
                .permute(0, 2, 3, 1)
                .reshape(-1, 8)
            )
            y = labels[:, i * 6 : (i + 1) * 6, j * 6 : (j + 1) * 6].reshape(-1)
            if bool(((y != 255) & (y != 0)).any()):
                valid = y != 255
                per_row, _ = supcon_per_anchor_reference(
                    z[valid].detach(), y[valid], torch.tensor([0, int(valid.sum())]), 0.1, True, 255
                )
                groups.append(per_row.mean())
    assert len(groups) == 6 and criterion.diagnostics.segments.tolist() == [6]
    torch.testing.assert_close(loss, torch.stack(groups).mean())


def test_pixel_loss_bad_inputs():
    maps, labels = make_maps()
    criterion = PixelContrastiveLoss(sampler="balanced")
    with pytest.raises(ValueError, match="embeddings"):
        criterion([], labels)
    with pytest.raises(ValueError, match=r"embeddings\[1\]"):
        criterion([maps[0], maps[1][:2]], labels)
    with pytest.raises(ValueError, match="labels must be \\(B, H, W\\)"):
        criterion(maps, labels[0])
    with pytest.raises(TypeError, match="labels must be an integer"):
        criterion(maps, labels.float())
    with pytest.raises(ValueError, match="labels must be >= 0"):
        criterion(maps, labels - 2)
    with pytest.raises(ValueError, match="sampler"):
        PixelContrastiveLoss(sampler="random")
    with pytest.raises(ValueError, match="weighting"):
        PixelContrastiveLoss(weighting="balanced")
    with pytest.raises(ValueError, match="temperature"):
        PixelContrastiveLoss(temperature=(0.1, 0.2, 0.3))(maps, labels)


# ------------------------------------------------------------------ the package's surface
def test_import_mcsc_needs_torch_alone():
    """``import mcsc`` and the losses must work without the trainer's dependencies."""
    heavy = [
        "scipy",
        "timm",
        "skimage",
        "h5py",
        "nibabel",
        "matplotlib",
        "yaml",
        "tensorboard",
        "torchvision",
        "pytorch_metric_learning",
    ]
    code = (
        "import sys\n"
        f"for name in {heavy!r}:\n"
        "    sys.modules[name] = None  # importing it now raises ImportError\n"
        "import torch, mcsc, mcsc.losses\n"
        "z = torch.nn.functional.normalize(torch.randn(2, 4, 8, 8), dim=1)\n"
        "y = torch.randint(0, 3, (2, 8, 8))\n"
        "for sampler in ('blocks', 'balanced', 'all'):\n"
        "    assert torch.isfinite(mcsc.PixelContrastiveLoss(sampler=sampler, block_sizes=2)(z, y))\n"
        "assert torch.isfinite(mcsc.SupConLoss()(torch.randn(10, 4), torch.randint(0, 2, (10,))))\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_help_lists_the_public_names_with_shapes():
    text = pydoc.render_doc(mcsc, renderer=pydoc.plaintext)
    for name in ("SupConLoss", "CrossBatchMemory", "PixelContrastiveLoss"):
        assert f"class {name}(" in text, name
    for name in ("supcon_loss", "backend"):
        assert f"\n    {name}(" in text, name
    for name in mcsc.losses.__all__:
        doc = getattr(mcsc.losses, name).__doc__
        assert doc and ("(" in doc), f"{name} has no docstring with shapes"


# ------------------------------------------------------------------------- README example
def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def test_readme_example_trains_and_the_loss_goes_down():
    section = readme_section("Use the loss in your own model")
    blocks = [part.split("```", 1)[0] for part in section.split("```python\n")[1:]]
    assert blocks
    namespace = {"__name__": "readme_example"}
    torch.manual_seed(0)
    for code in blocks:  # every snippet of the section, in order, in one namespace
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (the README is ours)
    history = namespace["history"]
    assert len(history) >= 10 and all(math.isfinite(v) for v in history)
    assert sum(history[-3:]) / 3 < 0.9 * sum(history[:3]) / 3
