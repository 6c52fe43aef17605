"""Where tensors run, in what precision and in what layout.

``auto`` precision: CUDA when present, with bf16 autocast (fp16 and a grad scaler on GPUs
without bf16), else the CPU, with bf16 autocast where it has native bf16. ``bf16`` and ``fp16``
force one (fp16 always with a grad scaler, on the CPU too); ``off`` runs fp32.

Layout and norm kernel: on the CPU channels-last with the group-norm kernel, which keeps that
layout (``docs/benchmarks.md``). On CUDA, PyTorch's group norm makes its input contiguous and
autocast runs it in fp32, so channels-last would be converted twice per norm layer; CUDA
therefore defaults to channels-first with the instance-norm kernel. ``benchmarks/gpu.py``
times all four combinations on a GPU."""

from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from segment.errors import SegmentError
from segment.models.blocks import InstanceNorm


class DeviceError(SegmentError):
    """The requested device is not available."""


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full fp32
    channels_last: bool
    # Every convolution through oneDNN (see route_convolutions_through_onednn).
    onednn_convolutions: bool = False
    # How InstanceNorm layers compute: "group" (GroupNorm's kernel) or "instance".
    norm_kernel: str = "group"

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    @property
    def non_blocking(self) -> bool:
        return self.device.type == "cuda"

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's range."""
        return self.amp_dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Move a batch tensor, in channels-last layout when that is faster."""
        tensor = tensor.to(self.device, non_blocking=self.non_blocking)
        if self.channels_last and tensor.dim() in (4, 5):
            layout = torch.channels_last if tensor.dim() == 4 else torch.channels_last_3d
            tensor = tensor.contiguous(memory_format=layout)
        return tensor

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            spatial_dims = getattr(getattr(model, "config", None), "spatial_dims", 3)
            model = model.to(
                memory_format=torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
            )
        if self.onednn_convolutions:
            route_convolutions_through_onednn(model)
        use_norm_kernel(model, self.norm_kernel)
        return model

    def describe(self) -> str:
        precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 AMP"}[self.amp_dtype]
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        layout = "channels-last" if self.channels_last else "channels-first"
        return f"{self.device.type} ({name}), {precision}, {layout}, {self.norm_kernel}-norm kernel"


def _onednn_conv_forward(conv: nn.Module, input: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    return torch.mkldnn_convolution(
        input, weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups
    )


def route_convolutions_through_onednn(model: nn.Module) -> None:
    """Run ``model``'s 2D and 3D convolutions on oneDNN's kernels, whatever the input size.

    For an fp32 batch of one, PyTorch picks its native im2col convolution whenever
    batch x channels x the first spatial sizes is at most 20,480 (ATen's ``use_mkldnn``), which
    is every convolution of a hippocampus volume, and there oneDNN's kernels are several times
    faster (``benchmarks/inference.py`` times both; figures in ``docs/benchmarks.md``).
    Gradients still flow: the backward pass is PyTorch's own."""
    for module in model.modules():
        if (
            type(module) in (nn.Conv2d, nn.Conv3d)
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        ):
            module._conv_forward = types.MethodType(_onednn_conv_forward, module)


def use_norm_kernel(model: nn.Module, kernel: str) -> None:
    """Compute every :class:`~segment.models.blocks.InstanceNorm` of ``model`` with ``kernel``;
    the result and the weights are the same either way."""
    for module in model.modules():
        if isinstance(module, InstanceNorm):
            module.kernel = kernel


@functools.cache
def cpu_supports_bf16() -> bool:
    """Native bf16 arithmetic (AVX-512 BF16 or AMX). oneDNN also accepts plain AVX-512, where
    it emulates bf16 and autocast runs slower than fp32."""
    onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: trust oneDNN alone
        return onednn
    return onednn and bool(flags & {"avx512_bf16", "amx_bf16"})


def choose_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for ``cuda`` without one is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(
            "--device cuda was requested but PyTorch sees no CUDA GPU; use --device cpu or auto."
        )
    if requested != "cpu" and not requested.startswith("cuda"):
        raise DeviceError(f"Unknown device {requested!r}; use auto, cpu or cuda.")
    return torch.device(requested)


def precision_for(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype that ``amp`` (auto, bf16, fp16 or off) gives on ``device``."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


def make_runtime(
    requested: str = "auto",
    amp: str = "auto",
    channels_last: bool | None = None,
    norm_kernel: str | None = None,
) -> Runtime:
    """The runtime for device ``requested``; ``channels_last`` and ``norm_kernel`` left as None
    take the device's defaults (see the module docstring)."""
    device = choose_device(requested)
    amp_dtype = precision_for(device, amp)
    on_cuda = device.type == "cuda"
    if channels_last is None:
        channels_last = not on_cuda
    if norm_kernel is None:
        norm_kernel = "instance" if on_cuda else "group"
    # bf16 autocast already takes oneDNN's kernels, and would not cast for a direct call.
    onednn = device.type == "cpu" and amp_dtype is None and torch.backends.mkldnn.is_available()
    return Runtime(device, amp_dtype, channels_last, onednn, norm_kernel)
