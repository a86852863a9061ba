"""Backbones, heads and the local Swin checkpoint loader."""

import re

import pytest
import torch

from mcsc.losses import MultiScaleContrastiveLoss, supervised_loss
from mcsc.models import (ContrastiveHeads, SegmentationOutput, SwinUNet, UNet, build_projection_heads,
                         feature_index, load_swin_encoder_checkpoint)

TINY_SWIN = dict(embed_dim=12, num_heads=(1, 2, 4, 8), window_size=4, drop_path_rate=0.0)


@pytest.mark.parametrize("size", [32, 48, 64])
def test_unet_shapes(size):
    model = UNet(in_channels=1, num_classes=3)
    out = model(torch.randn(2, 1, size, size))
    assert isinstance(out, SegmentationOutput)
    assert out.logits.shape == (2, 3, size, size)
    assert [tuple(f.shape) for f in out.features] == [
        (2, 16, size, size), (2, 32, size // 2, size // 2), (2, 64, size // 4, size // 4), (2, 128, size // 8, size // 8)]
    assert model.feature_channels == (16, 32, 64, 128) and model.feature_strides == (1, 2, 4, 8)


def test_unet_configurable_and_bad_input():
    model = UNet(in_channels=2, num_classes=5, channels=(4, 8, 16), dropout=(0.0, 0.0, 0.0))
    out = model(torch.randn(1, 2, 12, 20))
    assert out.logits.shape == (1, 5, 12, 20)
    assert [tuple(f.shape) for f in out.features] == [(1, 4, 12, 20), (1, 8, 6, 10)]
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 2, 10, 20))
    with pytest.raises(ValueError, match="dropout"):
        UNet(channels=(4, 8), dropout=(0.1,))


@pytest.mark.parametrize("size", [32, 64])
def test_swin_unet_shapes(size):
    model = SwinUNet(img_size=size, num_classes=4, **TINY_SWIN)
    out = model(torch.randn(2, 1, size, size))
    assert out.logits.shape == (2, 4, size, size)
    assert [tuple(f.shape) for f in out.features] == [
        (2, 12, size, size), (2, 12, size // 4, size // 4), (2, 24, size // 8, size // 8), (2, 48, size // 16, size // 16)]
    assert model.feature_channels == (12, 12, 24, 48) and model.feature_strides == (1, 4, 8, 16)


def test_swin_unet_default_is_the_paper_model():
    model = SwinUNet()
    assert model.feature_channels == (96, 96, 192, 384)
    with torch.no_grad():
        out = model(torch.randn(1, 1, 224, 224))
    assert [tuple(f.shape[1:]) for f in out.features] == [(96, 224, 224), (96, 56, 56), (192, 28, 28), (384, 14, 14)]
    assert feature_index(model, 8) == 2 and feature_index(UNet(), 8) == 3 and feature_index(model, 1) == 0


def test_swin_unet_bad_configuration():
    with pytest.raises(ValueError, match="img_size"):
        SwinUNet(img_size=100, **TINY_SWIN)
    with pytest.raises(ValueError, match="window_size"):
        SwinUNet(img_size=96, **TINY_SWIN)  # stage 2 has 6x6 tokens: no whole 4x4 windows
    with pytest.raises(ValueError, match="num_heads"):
        SwinUNet(img_size=64, embed_dim=12, num_heads=(5, 2, 4, 8), window_size=4)
    with pytest.raises(ValueError, match=r"x must be \(B, 1, 32, 32\)"):
        SwinUNet(img_size=32, **TINY_SWIN)(torch.randn(1, 1, 64, 64))


def test_projection_heads_share_the_last_convolution():
    heads = build_projection_heads([16, 128], [96, 192], hidden=32, out=8)
    assert isinstance(heads, ContrastiveHeads)
    for scale in range(2):
        assert heads.cnn_heads[scale].shared is heads.swin_heads[scale].shared is heads.shared[scale]
    distinct = {id(p) for p in heads.parameters()}
    # per scale: two first convolutions (weight, bias) + one shared convolution (weight, bias),
    # plus the LayerNorm (weight, bias) of the coarse Swin head
    assert len(distinct) == len(list(heads.parameters())) == 14
    cnn, swin = heads([torch.randn(2, 16, 8, 8), torch.randn(2, 128, 2, 2)],
                      [torch.randn(2, 96, 8, 8), torch.randn(2, 192, 2, 2)])
    assert [tuple(e.shape) for e in cnn] == [(2, 8, 8, 8), (2, 8, 2, 2)] == [tuple(e.shape) for e in swin]
    for e in cnn + swin:
        torch.testing.assert_close(e.norm(dim=1), torch.ones(e.shape[0], *e.shape[2:]))
    with pytest.raises(ValueError, match="one per scale"):
        heads([torch.randn(2, 16, 8, 8)], [torch.randn(2, 96, 8, 8)])


def test_the_coarse_swin_head_normalises_its_input_as_the_public_code():
    heads = build_projection_heads([16, 128], [96, 192], hidden=32, out=8)
    assert isinstance(heads.swin_heads[1].norm, torch.nn.LayerNorm) and heads.swin_heads[1].norm.normalized_shape == (192,)
    for head in (heads.cnn_heads[0], heads.cnn_heads[1], heads.swin_heads[0]):
        assert isinstance(head.norm, torch.nn.Identity)
    # the norm runs over the channels: a per-pixel affine change of the input changes nothing
    x = torch.randn(2, 192, 3, 3)
    shift, scale = torch.randn(2, 1, 3, 3), torch.rand(2, 1, 3, 3) + 0.5
    head = heads.swin_heads[1]
    torch.testing.assert_close(head(x * scale + shift), head(x), rtol=1e-4, atol=1e-4)
    plain = build_projection_heads([16, 128], [96, 192], swin_layer_norm=[False, False])
    assert all(isinstance(h.norm, torch.nn.Identity) for h in plain.swin_heads)
    with pytest.raises(ValueError, match="swin_layer_norm"):
        build_projection_heads([16, 128], [96, 192], swin_layer_norm=[True])


def test_swin_drop_path_is_configurable_and_0_2_by_default():
    def rates(model):
        return [block.drop_path1.drop_prob if hasattr(block.drop_path1, "drop_prob") else 0.0
                for stage in model.encoder.layers for block in stage.blocks]

    assert max(rates(SwinUNet(img_size=32, embed_dim=12, num_heads=(1, 2, 4, 8), window_size=4))) == pytest.approx(0.2)
    assert max(rates(SwinUNet(img_size=32, **dict(TINY_SWIN, drop_path_rate=0.35)))) == pytest.approx(0.35)


def test_gradients_reach_both_networks_and_all_heads():
    torch.manual_seed(0)
    size, labelled = 32, 2
    cnn = UNet(num_classes=3, channels=(4, 8, 16, 32, 64), dropout=(0.0,) * 5)
    swin = SwinUNet(img_size=size, num_classes=3, **TINY_SWIN)
    ci, si = feature_index(cnn, 8), feature_index(swin, 8)
    heads = build_projection_heads([4, cnn.feature_channels[ci]], [12, swin.feature_channels[si]], hidden=16, out=8)
    criterion = MultiScaleContrastiveLoss(sampler="all")
    images = torch.randn(4, 1, size, size)
    labels = torch.randint(0, 3, (labelled, size, size))
    a, b = cnn(images), swin(images)
    cnn_emb, swin_emb = heads([a.features[0], a.features[ci]], [b.features[0], b.features[si]])
    contrastive = criterion(cnn_emb, swin_emb, labels, a.logits, b.logits, labelled_count=labelled)
    loss = supervised_loss(a.logits[:labelled], labels, 3) + supervised_loss(b.logits[:labelled], labels, 3) \
        + contrastive
    loss.backward()
    for name, module in [("unet", cnn), ("swin", swin), ("heads", heads)]:
        for pname, p in module.named_parameters():
            assert p.grad is not None, f"{name}.{pname} got no gradient"
    for p in heads.parameters():
        assert p.grad.abs().sum() > 0
    # the contrastive term alone reaches both encoders
    for module in (cnn, swin, heads):
        module.zero_grad()
    a, b = cnn(images), swin(images)
    cnn_emb, swin_emb = heads([a.features[0], a.features[ci]], [b.features[0], b.features[si]])
    criterion(cnn_emb, swin_emb, labels, a.logits, b.logits, labelled_count=labelled).backward()
    assert cnn.encoder[0].block[0].weight.grad.abs().sum() > 0
    assert swin.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def _to_original_layout(state):
    """timm layout (downsample at the start of stage i) -> Microsoft layout (end of stage i - 1)."""
    return {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k): v
            for k, v in state.items()}


def test_swin_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    source = SwinUNet(img_size=32, **TINY_SWIN)
    path = tmp_path / "encoder.pth"
    torch.save(source.encoder.state_dict(), path)
    target = SwinUNet(img_size=32, pretrained=path, **TINY_SWIN)
    for key, value in source.encoder.state_dict().items():
        torch.testing.assert_close(target.encoder.state_dict()[key], value, rtol=0, atol=0)
    # the decoder stage of width 12 (the last one) mirrors encoder stage 0, as in Swin-UNet
    torch.testing.assert_close(target.decoder[-1].blocks[1].mlp.fc1.weight,
                               source.encoder.layers[0].blocks[1].mlp.fc1.weight, rtol=0, atol=0)
    torch.testing.assert_close(target.decoder[0].blocks[0].attn.qkv.weight,
                               source.encoder.layers[2].blocks[0].attn.qkv.weight, rtol=0, atol=0)


def test_swin_checkpoint_original_layout_rgb_and_deeper_blocks(tmp_path):
    torch.manual_seed(0)
    source = SwinUNet(img_size=32, in_channels=3, **TINY_SWIN)
    state = _to_original_layout(source.encoder.state_dict())
    # a full Swin-T has more blocks in stage 2 and an ImageNet head: both are skipped
    for key, value in list(state.items()):
        if key.startswith("layers.2.blocks.1."):
            state[key.replace("blocks.1.", "blocks.5.")] = value.clone()
    state["head.weight"] = torch.zeros(1000, 96)
    path = tmp_path / "swin_original.pth"
    torch.save({"model": state}, path)
    target = SwinUNet(img_size=32, in_channels=1, **TINY_SWIN)
    skipped = load_swin_encoder_checkpoint(target, path)
    assert "head.weight" in skipped and any(k.startswith("layers.2.blocks.5.") for k in skipped)
    # grey input: the RGB patch embedding is summed over its input channels
    torch.testing.assert_close(target.encoder.patch_embed.proj.weight,
                               source.encoder.patch_embed.proj.weight.sum(1, keepdim=True))
    torch.testing.assert_close(target.encoder.layers[1].downsample.reduction.weight,
                               source.encoder.layers[1].downsample.reduction.weight, rtol=0, atol=0)


def test_swin_checkpoint_errors(tmp_path):
    model = SwinUNet(img_size=32, **TINY_SWIN)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_swin_encoder_checkpoint(model, tmp_path / "missing.pth")
    other = SwinUNet(img_size=32, embed_dim=16, num_heads=(1, 2, 4, 8), window_size=4)
    state = other.encoder.state_dict()
    del state["norm.bias"]
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    before = model.encoder.norm.weight.clone()
    with pytest.raises(ValueError) as error:
        load_swin_encoder_checkpoint(model, path)
    message = str(error.value)
    assert "missing keys: ['norm.bias']" in message
    assert "patch_embed.proj.weight: checkpoint (16, 1, 4, 4) vs model (12, 1, 4, 4)" in message
    torch.testing.assert_close(model.encoder.norm.weight, before)  # nothing was loaded
