"""Decoding on a CPU with each linear layer's weights packed once for oneDNN.

A decode step multiplies a few rows (the live answers) by every weight matrix of the model.
For such shapes PyTorch's CPU matrix product re-lays out (packs) the weight matrix on every
call; oneDNN's linear with weights packed once in its own blocked layout skips that
(measured: `benchmarks/results/2026-12-07-cpu-generation-packed.md`).

`packed_linears(model)` packs the weights of every `torch.nn.Linear` of a model on a CPU for
the span of one generation call (`iter_responses`), and `decode_pass()` marks the
forward passes that may use them (the decode loop's steps, `generate`). Everything else in that
span (a loss, a CE scorer, a forward with gradients) runs the layers as they are, so the
packed copies change only how answers are decoded: the same products in another summation
order, within float32 rounding (tested against the plain layers). In bfloat16, PyTorch's own
CPU product is oneDNN's too: at every decode-step shape measured, the packed products were
F.linear's bit for bit (`benchmarks/results/2026-12-07-cpu-gemm-packed-bf16.md`).

Only where it is safe and pays: float32 weights on a CPU with oneDNN (`torch.backends.mkldnn`),
or bfloat16 weights on a CPU that multiplies bf16 in hardware (AVX512-BF16 or AMX; elsewhere
bf16 is emulated, and packing it is untried), all of one dtype; plain `nn.Linear` modules (not
subclasses such as quantised layers), and only when the packed copies (one more copy of those
weights while decoding) fit in a quarter of the memory the machine has available. `SRD_CPU_PACKED=0` turns it off.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import torch

_STATE = threading.local()  # depth of decode_pass() in this thread
_PACKABLE = (torch.float32, torch.bfloat16)  # bfloat16 only where the CPU has it in hardware


def _ops_available() -> bool:
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


def _available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        for line in open("/proc/meminfo", encoding="ascii"):  # noqa: SIM115 - read through once
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _packable(model: Any) -> list[torch.nn.Linear]:
    """The linear layers `packed_linears` would pack, or [] where it does not apply."""
    if os.environ.get("SRD_CPU_PACKED", "1") == "0" or not _ops_available():
        return []
    layers = [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in vars(m)]

    dtypes = {m.weight.dtype for m in layers}
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    if dtype not in _PACKABLE or (dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return []

    def plain(w: torch.Tensor) -> bool:  # a whole CPU matrix (not a shard, a DTensor, a placeholder)
        whole = type(w.data) is torch.Tensor and w.dim() == 2 and w.numel() > 0
        return whole and w.device.type == "cpu"

    if not all(plain(m.weight) for m in layers) or not all(m.bias is None or m.bias.dtype == dtype for m in layers):
        return []
    free = _available_bytes()
    size = sum({id(m.weight): m.weight.numel() * m.weight.element_size() for m in layers}.values())
    return layers if free is not None and size <= free // 4 else []


@contextlib.contextmanager
def packed_linears(model: Any, rows: int = 16) -> Iterator[bool]:
    """Pack every plain linear layer's weights of a float32 (or, with bf16 in hardware,
    bfloat16) CPU model (`rows`: the batch the layout is tuned for) and route `decode_pass()`
    forwards through them until the block ends; yields whether it did. The weights must not change inside the block."""
    layers, patched = _packable(model), []
    try:
        for m in layers:
            packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows)
            bias = None if m.bias is None else m.bias.detach()
            m.forward = _packed_forward(m.forward, packed, bias, m.out_features, m.weight.dtype)
            patched.append(m)
    except RuntimeError:  # a oneDNN build that cannot pack these: decode with the layers as they are
        for m in patched:
            del m.forward
        patched = []
    try:
        yield bool(patched)
    finally:
        for m in patched:
            if "forward" in vars(m):
                del m.forward  # the class's own forward again


def _packed_forward(plain: Any, packed: torch.Tensor, bias: torch.Tensor | None, width: int, dtype: torch.dtype) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        decoding = getattr(_STATE, "depth", 0) and not torch.is_grad_enabled()
        if decoding and x.dtype == dtype and not torch.is_autocast_enabled("cpu"):
            flat = x.reshape(-1, x.shape[-1]).contiguous()
            try:
                y = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
            except RuntimeError:  # a shape this oneDNN build will not take: the plain product
                return plain(x)
            return y.reshape(*x.shape[:-1], width)
        return plain(x)

    forward.srd_packed = True  # type: ignore[attr-defined]
    return forward


def is_packed(module: Any) -> bool:
    """Whether `module`'s forward is a packed one (inside `packed_linears`)."""
    return bool(getattr(vars(module).get("forward"), "srd_packed", False))


@contextlib.contextmanager
def decode_pass() -> Iterator[None]:
    """The forward passes in this block are decoding ones: packed layers may serve them."""
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1
