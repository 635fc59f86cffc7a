"""The student side before and after CRAM: RD4AD's one-class bottleneck and decoder.

OCBE (one-class bottleneck embedding, RD4AD's ``BN_layer``) fuses the three teacher levels
at the level-3 resolution (level 1 through two strided 3x3 convs, level 2 through one,
each followed by BatchNorm and ReLU), concatenates them (3 C_3 channels) and runs residual
blocks down to the embedding (D, H / 32, W / 32): 2048 x 8 x 8 for WRN50 at 256 x 256.

The decoder mirrors the teacher: three stages, each opened by a block that upsamples by a
transposed 2x2 conv (stride 2) and followed by plain blocks, produce C_3 at stride 16, C_2
at stride 8 and C_1 at stride 4; they are returned in teacher order (fine to coarse).

Blocks are ResNet's basic (two 3x3) or bottleneck (1x1, 3x3, 1x1) residual blocks; one
class each, whose ``resample`` argument makes the 3x3 a stride-2 conv ("down", OCBE) or a
transposed 2x2 conv ("up", decoder), with a matching 1x1/2x2 shortcut. Sizes come from
:class:`snl.config.Architecture`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)


def _resampling_conv(cin: int, cout: int, kernel: int, resample: str | None) -> nn.Module:
    """A conv of ``kernel`` (1 or 3), strided for "down", a transposed 2x2 conv for "up"."""
    if resample == "up":
        return nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False)
    return _conv(cin, cout, kernel, 2 if resample == "down" else 1)


class _Residual(nn.Module):
    def __init__(self, cin: int, cout: int, resample: str | None):
        super().__init__()
        if resample is None and cin == cout:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(_resampling_conv(cin, cout, 1, resample),
                                          nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class BasicBlock(_Residual):
    """3x3 (resampling) conv, BN, ReLU, 3x3 conv, BN, plus shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, resample: str | None = None):
        super().__init__(cin, cout, resample)
        self.body = nn.Sequential(
            _resampling_conv(cin, cout, 3, resample), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            _conv(cout, cout, 3), nn.BatchNorm2d(cout),
        )


class BottleneckBlock(_Residual):
    """1x1 conv to ``width``, 3x3 (resampling) conv, 1x1 conv to ``cout``, plus shortcut."""

    def __init__(self, cin: int, cout: int, resample: str | None = None, width_ratio: float = 0.25):
        super().__init__(cin, cout, resample)
        width = max(1, int(cout * width_ratio))
        self.body = nn.Sequential(
            _conv(cin, width, 1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            _resampling_conv(width, width, 3, resample), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            _conv(width, cout, 1), nn.BatchNorm2d(cout),
        )


def make_block(kind: str, cin: int, cout: int, resample: str | None,
               width_ratio: float) -> nn.Module:
    if kind == "basic":
        return BasicBlock(cin, cout, resample)
    return BottleneckBlock(cin, cout, resample, width_ratio)


def init_weights(module: nn.Module) -> None:
    """He init of every conv (fan_out, as torchvision's ResNet and RD4AD), BN to identity."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class OCBE(nn.Module):
    """One-class bottleneck embedding: three teacher levels -> (B, D, H / 32, W / 32).

    Args:
        channels: teacher channels (C_1, C_2, C_3) at strides 4, 8, 16.
        embed_dim: D.
        block: "basic" or "bottleneck".
        width_ratio: bottleneck middle width / output width.
        depth: number of residual blocks (the first one halves the resolution).
    """

    def __init__(self, channels: Sequence[int], embed_dim: int, block: str,
                 width_ratio: float, depth: int):
        super().__init__()
        c1, c2, c3 = channels
        self.fuse1 = nn.Sequential(
            _conv(c1, c2, 3, 2), nn.BatchNorm2d(c2), nn.ReLU(inplace=True),
            _conv(c2, c3, 3, 2), nn.BatchNorm2d(c3), nn.ReLU(inplace=True),
        )
        self.fuse2 = nn.Sequential(_conv(c2, c3, 3, 2), nn.BatchNorm2d(c3), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(
            make_block(block, 3 * c3, embed_dim, "down", width_ratio),
            *[make_block(block, embed_dim, embed_dim, None, width_ratio)
              for _ in range(depth - 1)],
        )
        init_weights(self)

    def forward(self, levels: Sequence[Tensor]) -> Tensor:
        """(B, C_k, H_k, W_k) x 3 -> (B, D, H_3 / 2, W_3 / 2)."""
        f1, f2, f3 = levels
        return self.blocks(torch.cat([self.fuse1(f1), self.fuse2(f2), f3], dim=1))


class Decoder(nn.Module):
    """Student decoder: (B, D, h, w) -> three levels in teacher order (fine to coarse).

    Args:
        channels: teacher channels (C_1, C_2, C_3) the student must reproduce.
        embed_dim: D.
        block: "basic" or "bottleneck".
        width_ratio: bottleneck middle width / output width.
        depths: blocks per stage, coarse (stride 16) to fine (stride 4).
    """

    def __init__(self, channels: Sequence[int], embed_dim: int, block: str,
                 width_ratio: float, depths: Sequence[int]):
        super().__init__()
        c1, c2, c3 = channels
        sizes = [(embed_dim, c3), (c3, c2), (c2, c1)]
        self.stages = nn.ModuleList(
            nn.Sequential(
                make_block(block, cin, cout, "up", width_ratio),
                *[make_block(block, cout, cout, None, width_ratio) for _ in range(depth - 1)],
            )
            for (cin, cout), depth in zip(sizes, depths, strict=True)
        )
        init_weights(self)

    def forward(self, z: Tensor) -> list[Tensor]:
        """(B, D, h, w) -> [(B, C_1, 8h, 8w), (B, C_2, 4h, 4w), (B, C_3, 2h, 2w)]."""
        outputs = []
        for stage in self.stages:
            z = stage(z)
            outputs.append(z)
        return outputs[::-1]
