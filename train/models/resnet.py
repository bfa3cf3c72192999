"""The second paper's improved bottleneck ResNet, and the plain ResNet it is compared with.

Improved block (the paper's three changes to a bottleneck block):
  1. the stride-2 downsampling sits in the 3x3 conv, not in the first 1x1 conv
     (a strided 1x1 discards three quarters of its input);
  2. PReLU instead of ReLU;
  3. the activation lives inside the residual branch: nothing is applied after the
     addition, so the identity path stays clean from block to block.

    x -> 1x1 -> BN -> PReLU -> 3x3 (stride s) -> BN -> PReLU -> 1x1 -> BN -> (+ shortcut)

Plain block (the baseline): 1x1 (stride s) -> BN -> ReLU -> 3x3 -> BN -> ReLU -> 1x1 -> BN,
then ReLU after the addition, as in He et al. (2016).

Adapted to 48x48 faces: a 3x3 stride-1 stem (a 7x7 stride-2 stem and max-pool, made for
224x224 ImageNet images, would leave 12x12 after two layers), then four stages of
`blocks` bottleneck blocks at 48, 24, 12 and 6 pixels with bottleneck widths
w, 2w, 4w, 8w (outputs 4x that), global average pooling and one linear layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

EXPANSION = 4


@dataclass(frozen=True)
class ResNetConfig:
    num_classes: int = 7
    width: int = 16
    blocks: tuple[int, ...] = (2, 2, 2, 2)
    improved: bool = True
    dropout: float = 0.0


class Bottleneck(nn.Module):
    def __init__(self, in_ch: int, width: int, stride: int, improved: bool) -> None:
        super().__init__()
        out_ch = width * EXPANSION
        stride_1x1, stride_3x3 = (1, stride) if improved else (stride, 1)

        def act(channels: int) -> nn.Module:
            return nn.PReLU(channels) if improved else nn.ReLU(inplace=True)

        self.branch = nn.Sequential(
            nn.Conv2d(in_ch, width, 1, stride=stride_1x1, bias=False),
            nn.BatchNorm2d(width),
            act(width),
            nn.Conv2d(width, width, 3, stride=stride_3x3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            act(width),
            nn.Conv2d(width, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        # No zero-init of the last BN (Goyal et al. 2017) here: with nothing applied after
        # the addition, zero branches would make the whole network start out linear.
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        self.after_add: nn.Module = nn.Identity() if improved else nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after_add(self.branch(x) + self.shortcut(x))


class ResNet(nn.Module):
    input_size = 48

    def __init__(self, config: ResNetConfig = ResNetConfig()) -> None:
        super().__init__()
        w = config.width
        self.stem = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.PReLU(w) if config.improved else nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        in_ch = w
        for index, count in enumerate(config.blocks):
            width = w * 2**index
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                stages.append(Bottleneck(in_ch, width, stride, config.improved))
                in_ch = width * EXPANSION
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(config.dropout),
            nn.Linear(in_ch, config.num_classes),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))
