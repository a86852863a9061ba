"""Swin-UNet (Cao et al. 2021) assembled from timm's channels-last Swin blocks.

The encoder mirrors timm's ``SwinTransformer`` parameter names (``patch_embed``, ``layers.<i>``
with ``downsample`` at the *start* of a stage, ``blocks.<j>``, ``norm``) so timm's checkpoint
filter maps an original Swin checkpoint onto it. The decoder (patch expanding, skip
concatenation, Swin blocks) is ours and follows the Swin-UNet paper.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import torch
from timm.layers import PatchEmbed, trunc_normal_
from timm.models import adapt_input_conv
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, checkpoint_filter_fn
from torch import nn

from mcsc.models.heads import ClassifierHead
from mcsc.models.output import SegmentationOutput


class PatchExpand(nn.Module):
    """Upsample channels-last tokens ``scale`` times per side: linear expansion, pixel shuffle,
    LayerNorm.

    ``scale=2`` (Swin-UNet's PatchExpand): (B, H, W, C) -> (B, 2H, 2W, C / 2).
    ``scale=4`` (Swin-UNet's final x4 expansion): (B, H, W, C) -> (B, 4H, 4W, C).
    """

    def __init__(self, dim: int, scale: int):
        super().__init__()
        self.scale = scale
        self.out_dim = dim // 2 if scale == 2 else dim
        self.expand = nn.Linear(dim, scale * scale * self.out_dim, bias=False)
        self.norm = nn.LayerNorm(self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        s = self.scale
        # channel layout (p1, p2, c) as in Swin-UNet's einops rearrange
        x = self.expand(x).reshape(b, h, w, s, s, self.out_dim)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s, self.out_dim)
        return self.norm(x)


class SwinStage(nn.Module):
    """``downsample`` (PatchMerging or Identity) followed by ``depth`` Swin blocks, channels-last.

    With ``upsample=True`` the stage ends with a :class:`PatchExpand` instead (decoder stages).
    """

    def __init__(self, in_dim: int, dim: int, resolution: int, depth: int, num_heads: int,
                 window_size: int, drop_path: Sequence[float], downsample: bool = False,
                 upsample: bool = False):
        super().__init__()
        self.downsample = PatchMerging(in_dim, out_dim=dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*(
            SwinTransformerBlock(dim, input_resolution=(resolution, resolution), num_heads=num_heads,
                                 window_size=window_size, shift_size=0 if j % 2 == 0 else window_size // 2,
                                 drop_path=drop_path[j])
            for j in range(depth)))
        self.upsample = PatchExpand(dim, 2) if upsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.blocks(self.downsample(x)))


class SwinEncoder(nn.Module):
    """Patch embedding, Swin stages and final norm with timm's ``SwinTransformer`` names.

    Forward: (B, in_channels, S, S) -> (bottleneck (B, S/(4*2^(n-1)), ..., C_last) normalised,
    list of the inputs of every stage's blocks, channels-last, finest first — the skips).
    """

    def __init__(self, img_size: int, in_channels: int, embed_dim: int, depths: Sequence[int],
                 num_heads: Sequence[int], window_size: int, drop_path: Sequence[float], patch_size: int):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_channels,
                                      embed_dim=embed_dim, norm_layer=nn.LayerNorm, output_fmt="NHWC")
        grid = img_size // patch_size
        offsets = [sum(depths[:i]) for i in range(len(depths) + 1)]
        self.layers = nn.ModuleList(
            SwinStage(embed_dim * 2 ** max(i - 1, 0), embed_dim * 2 ** i, grid // 2 ** i, depths[i],
                      num_heads[i], window_size, drop_path[offsets[i]:offsets[i + 1]], downsample=i > 0)
            for i in range(len(depths)))
        self.norm = nn.LayerNorm(embed_dim * 2 ** (len(depths) - 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embed(x)
        skips = []
        for stage in self.layers:
            x = stage.downsample(x)
            skips.append(x)
            x = stage.blocks(x)
        return self.norm(x), skips


class SwinUNet(nn.Module):
    """Swin-UNet returning logits and the decoder features of every scale.

    Args:
        img_size: side of the square input; must be divisible by ``4 * 2**(len(depths) - 1)``,
            and every stage's side must be a multiple of ``window_size`` or at most it (then that
            stage uses one window covering the whole map, as Swin does).
        in_channels: image channels (1 for medical slices).
        num_classes: output classes.
        embed_dim, depths, num_heads, window_size: Swin configuration. The defaults are the
            method's Swin-T "lite" (96; 2, 2, 2, 2; 3, 6, 12, 24; 7 at 224x224).
        drop_path_rate: stochastic-depth rate, linearly increasing over the encoder blocks; the
            decoder mirrors the encoder's rates as Swin-UNet does. 0.2 as in the public MCSC
            configuration.
        pretrained: optional path of a **local** ImageNet Swin checkpoint; see
            :func:`load_swin_encoder_checkpoint`. ``None`` keeps the random initialisation.

    Forward: ``x`` (B, in_channels, img_size, img_size) float -> :class:`SegmentationOutput`
    with ``logits`` (B, num_classes, S, S) and ``features`` (channels-first, finest first), for
    n = len(depths), E = embed_dim, S = img_size:

    * ``features[0]``: (B, E, S, S) — after the final x4 patch expansion (classifier input);
    * ``features[1]``: (B, E, S/4, S/4) — last decoder stage, normalised;
    * ``features[k]`` for k = 2 .. n-1: (B, E * 2**(k-1), S / (4 * 2**(k-1)), ...) — output of
      a coarser decoder stage after its patch expansion (the bottleneck's expansion for k = n-1).

    With the defaults at 224x224: (96, 224), (96, 56), (192, 28), (384, 14) (channels, side).

    Attributes:
        feature_channels, feature_strides: channels and downsampling factor of each feature map.
    """

    patch_size = 4

    def __init__(self, img_size: int = 224, in_channels: int = 1, num_classes: int = 4, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, drop_path_rate: float = 0.2, pretrained: str | os.PathLike | None = None):
        super().__init__()
        depths, num_heads = tuple(int(d) for d in depths), tuple(int(h) for h in num_heads)
        _check_config(img_size, in_channels, num_classes, embed_dim, depths, num_heads, window_size,
                      drop_path_rate, self.patch_size)
        n = len(depths)
        self.img_size, self.in_channels, self.num_classes = img_size, in_channels, num_classes
        self.feature_channels = (embed_dim, embed_dim) + tuple(embed_dim * 2 ** k for k in range(1, n - 1))
        self.feature_strides = (1, 4) + tuple(4 * 2 ** k for k in range(1, n - 1))

        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        offsets = [sum(depths[:i]) for i in range(n + 1)]
        self.encoder = SwinEncoder(img_size, in_channels, embed_dim, depths, num_heads, window_size, dpr,
                                   self.patch_size)
        grid = img_size // self.patch_size
        # decoder[0] expands the bottleneck; decoder[k] (k >= 1) fuses the skip of encoder stage
        # n-1-k and runs blocks of that stage's width, then expands (except the last one).
        self.first_expand = PatchExpand(embed_dim * 2 ** (n - 1), 2)
        self.concat_back_dim = nn.ModuleList(
            nn.Linear(2 * embed_dim * 2 ** (n - 1 - k), embed_dim * 2 ** (n - 1 - k)) for k in range(1, n))
        self.decoder = nn.ModuleList(
            SwinStage(0, embed_dim * 2 ** (n - 1 - k), grid // 2 ** (n - 1 - k), depths[n - 1 - k],
                      num_heads[n - 1 - k], window_size, dpr[offsets[n - 1 - k]:offsets[n - k]],
                      upsample=k < n - 1)
            for k in range(1, n))
        self.norm_up = nn.LayerNorm(embed_dim)
        self.final_expand = PatchExpand(embed_dim, 4)
        self.classifier = ClassifierHead(embed_dim, num_classes)
        self.apply(_init_weights)
        if pretrained is not None:
            load_swin_encoder_checkpoint(self, pretrained)

    def forward(self, x: torch.Tensor) -> SegmentationOutput:
        expected = (self.in_channels, self.img_size, self.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must be (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        x, skips = self.encoder(x)
        x = self.first_expand(x)
        coarse = [x]
        for k, (fuse, stage) in enumerate(zip(self.concat_back_dim, self.decoder), start=1):
            x = stage(fuse(torch.cat([x, skips[len(skips) - 1 - k]], dim=-1)))
            coarse.append(x)
        last = self.norm_up(x)
        full = self.final_expand(last)
        # coarse[-1] is the last stage (reported normalised, as `last`) and coarse[-2] the
        # expansion to its width and resolution, which adds no new scale
        features = [full, last] + list(reversed(coarse[:-2]))
        features = tuple(f.permute(0, 3, 1, 2) for f in features)
        return SegmentationOutput(self.classifier(features[0]), features)


def _check_config(img_size, in_channels, num_classes, embed_dim, depths, num_heads, window_size,
                  drop_path_rate, patch_size) -> None:
    if len(depths) < 2 or any(d < 1 for d in depths):
        raise ValueError(f"depths must hold at least two positive values, got {depths}")
    if len(num_heads) != len(depths):
        raise ValueError(f"num_heads must have one value per stage ({len(depths)}), got {num_heads}")
    for i, heads in enumerate(num_heads):
        if heads < 1 or (embed_dim * 2 ** i) % heads:
            raise ValueError(f"num_heads[{i}]={heads} must divide the stage width {embed_dim * 2 ** i} "
                             f"(embed_dim={embed_dim})")
    if embed_dim < 2 or embed_dim % 2:
        raise ValueError(f"embed_dim must be even and positive, got {embed_dim}")
    if in_channels < 1 or num_classes < 1:
        raise ValueError(f"in_channels and num_classes must be positive, got {in_channels}, {num_classes}")
    if window_size < 1:
        raise ValueError(f"window_size must be positive, got {window_size}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    factor = patch_size * 2 ** (len(depths) - 1)
    if img_size < factor or img_size % factor:
        raise ValueError(f"img_size must be a multiple of patch_size * 2**(stages-1) = {factor}, got {img_size}")
    for i in range(len(depths)):
        side = img_size // patch_size // 2 ** i
        if side > window_size and side % window_size:
            raise ValueError(
                f"window_size={window_size} does not tile stage {i} ({side}x{side} tokens at img_size="
                f"{img_size}); img_size must be a multiple of patch_size * window_size * 2**(stages-1) = "
                f"{factor * window_size}")


def _init_weights(module: nn.Module) -> None:
    """Swin-UNet's initialisation: truncated-normal linears, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


_BLOCK_KEY = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")


def load_swin_encoder_checkpoint(model: SwinUNet, path: str | os.PathLike) -> list[str]:
    """Load an ImageNet Swin checkpoint from a local file into the encoder and mirror it into the decoder.

    Accepts timm's layout and the original Microsoft layout (``{"model": state_dict}``,
    downsampling at the end of a stage), which timm's ``checkpoint_filter_fn`` converts. A
    3-channel patch embedding is summed to ``in_channels`` as timm does for grey inputs.
    Classifier weights (``head.*``) and blocks deeper than the model's ``depths`` (a full Swin-T
    has 6 blocks in stage 3, the method's "lite" model 2) are skipped, as Swin-UNet does. Every
    encoder parameter must be found with the right shape, otherwise nothing is loaded.

    Then, like Swin-UNet, each decoder stage's Swin blocks receive the weights of the encoder
    stage of the same width. Never touches the network.

    Args:
        model: the :class:`SwinUNet` to fill.
        path: local file written by ``torch.save``.

    Returns:
        The checkpoint keys that were skipped (sorted).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a state dict, or keys are missing, unexpected or of the
            wrong shape (all of them are listed).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Swin checkpoint {path!r} does not exist (mcsc never downloads weights; "
                                f"pass a local file)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"Swin checkpoint {path!r} holds a {type(checkpoint).__name__}, not a state dict")
    state = checkpoint.get("model", checkpoint)
    state = state.get("state_dict", state)
    encoder = model.encoder
    depths = [len(stage.blocks) for stage in encoder.layers]

    skipped = []
    kept = {}
    for key, value in state.items():
        match = _BLOCK_KEY.match(key)
        deeper = match is not None and (int(match.group(1)) >= len(depths)
                                        or int(match.group(2)) >= depths[int(match.group(1))])
        if key.startswith("head.") or deeper:
            skipped.append(key)
        else:
            kept[key] = value
    patch_key = "patch_embed.proj.weight"
    if patch_key in kept and kept[patch_key].dim() == 4:
        in_ckpt = kept[patch_key].shape[1]
        if in_ckpt != model.in_channels:
            kept[patch_key] = adapt_input_conv(model.in_channels, kept[patch_key], base_chans=in_ckpt)
    try:
        converted = checkpoint_filter_fn(kept, encoder)
    except (AttributeError, RuntimeError) as error:
        raise ValueError(f"Swin checkpoint {path!r} does not fit the encoder: {error}") from error

    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong_shape = sorted(f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(expected[k].shape)}"
                         for k in set(expected) & set(converted) if converted[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"Swin checkpoint {path!r} does not fit the encoder (embed_dim, depths, num_heads or "
            f"in_channels differ?).\n  missing keys: {missing}\n  unexpected keys: {unexpected}\n"
            f"  wrong shapes: {wrong_shape}")
    encoder.load_state_dict(converted)

    n = len(encoder.layers)
    for k, stage in enumerate(model.decoder, start=1):
        source = encoder.layers[n - 1 - k].blocks
        for target_block, source_block in zip(stage.blocks, source):
            target_block.load_state_dict(source_block.state_dict())
    return sorted(skipped)
