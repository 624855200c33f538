"""What the hardware can do, decided once and shared by every stage that runs a model."""

from __future__ import annotations

import torch


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """'auto' -> bf16 on GPUs that support it and on CPUs with bf16 instructions
    (AVX512-BF16/AMX), else fp32; any other value is returned as is."""
    if precision != "auto":
        return precision
    if use_gpu:
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
