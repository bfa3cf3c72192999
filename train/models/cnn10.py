"""CNN10, the first paper's network (its Table 1), on 48x48 grayscale faces.

    input 48x48x1
    conv 1x1x32                     -> 48x48x32
    conv 5x5x32                     -> 44x44x32
    max-pool 2                      -> 22x22x32
    conv 3x3x64                     -> 20x20x64
    max-pool 2                      -> 10x10x64
    conv 3x3x128 (padding 1)        -> 10x10x128
    max-pool 2                      -> 5x5x128 = 3200
    FC 2048 + dropout 0.6
    FC 1024 + dropout 0.4
    FC 7 (softmax in the loss / at serving)

`batch_norm=True` adds batch normalisation after every conv and hidden FC layer;
the paper has none, so it is off by default and recorded in the card when used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class CNN10Config:
    num_classes: int = 7
    batch_norm: bool = False
    dropout_fc1: float = 0.6
    dropout_fc2: float = 0.4


def _conv(in_ch: int, out_ch: int, kernel: int, padding: int, batch_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, padding=padding, bias=not batch_norm)
    ]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.ReLU(inplace=True))
    return layers


def _dense(in_features: int, out_features: int, batch_norm: bool,
           dropout: float) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Linear(in_features, out_features, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(out_features))
    layers += [nn.ReLU(inplace=True), nn.Dropout(dropout)]
    return layers


class CNN10(nn.Module):
    input_size = 48

    def __init__(self, config: CNN10Config = CNN10Config()) -> None:
        super().__init__()
        bn = config.batch_norm
        self.features = nn.Sequential(
            *_conv(1, 32, 1, 0, bn),
            *_conv(32, 32, 5, 0, bn),
            nn.MaxPool2d(2),
            *_conv(32, 64, 3, 0, bn),
            nn.MaxPool2d(2),
            *_conv(64, 128, 3, 1, bn),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            *_dense(5 * 5 * 128, 2048, bn, config.dropout_fc1),
            *_dense(2048, 1024, bn, config.dropout_fc2),
            nn.Linear(1024, config.num_classes),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
