"""Tiny models shared by the tests (random init, built from configs: nothing is downloaded)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification


class TinyMLP(nn.Module):
    """Two linear layers around a non-linearity, widths divisible by 1, 2, 4 and 8."""

    def __init__(self, d_in: int = 16, hidden: int = 32, d_out: int = 8) -> None:
        super().__init__()
        self.lin0 = nn.Linear(d_in, hidden)
        self.act = nn.GELU()
        self.lin1 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.act(self.lin0(x)))


def tiny_vit_config(hidden_size: int = 32, num_labels: int = 3) -> ViTConfig:
    return ViTConfig(
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
        image_size=32,
        patch_size=8,
        num_labels=num_labels,
    )


def tiny_vit(seed: int = 0, hidden_size: int = 32) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return ViTForImageClassification(tiny_vit_config(hidden_size)).eval()


def tiny_mlp(seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP().eval()


class SmallConvNet(nn.Module):
    """Strided 3x3, 3x3 and 1x1 convolutions, then a linear head: every kind of Conv2d target."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.proj = nn.Conv2d(8, 16, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.body(x))
        x = self.proj(x).mean(dim=(2, 3))  # (batch, 16)
        return self.head(x)


def small_conv_net(seed: int = 0) -> SmallConvNet:
    torch.manual_seed(seed)
    return SmallConvNet().eval()
