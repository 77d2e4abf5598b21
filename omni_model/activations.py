"""Activation functions by transformers' `hidden_act` / `activation_function` names: the
ones the real configs this project loads may set (Dream's MLP, GLM-4-Voice's encoder)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
    "gelu_new": _tanh_gelu, "gelu_pytorch_tanh": _tanh_gelu, "gelu_fast": _tanh_gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}
