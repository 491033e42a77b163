"""Count the operators a call runs: what a GPU pays for when the arithmetic is small.

Where an adapter's arithmetic is a few percent of a layer's, as ALoRE's and
LoRA's are, a GPU step costs per operator (host dispatch and one kernel launch
each) rather than per multiply-add. This module counts both from
``torch.profiler`` on the CPU, deterministically:

- **ATen operators**: every ``aten::`` call, views and wrappers included
  (host dispatch).
- **Kernel-launching operators**: the ATen operators that would launch a
  kernel on a GPU. Counted at the innermost level (``linear`` is its
  ``addmm``; ``to`` is its ``copy_``), views, metadata, allocation and no-op
  conjugation resolution excluded. Two corrections make the CPU profile
  match a GPU's launches: a copy of a 0-dim tensor is the CPU's wrapping of a
  Python scalar (a kernel argument on a GPU, no launch), and an ``addmm``
  whose profile shows it copying its input first launches that copy and a
  GEMM (2).

Every count here is of one call of a training step or inference, run once
beforehand so one-time work (lazy initialisation) is not counted.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["NO_KERNEL", "count_ops", "OpCount"]

# ATen operators that never launch a kernel themselves: views, metadata, allocation, wrappers' no-ops.
NO_KERNEL = frozenset(
    "aten::" + name
    for name in (
        "view", "reshape", "_unsafe_view", "_reshape_alias", "as_strided", "t", "transpose", "permute", "expand",
        "expand_as", "view_as", "unsqueeze", "squeeze", "select", "slice", "narrow", "alias", "detach", "flatten",
        "unflatten", "movedim", "split", "split_with_sizes", "chunk", "unbind", "numpy_T", "contiguous", "to",
        "lift_fresh", "result_type", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
        "resize_", "resolve_conj", "resolve_neg", "conj", "_conj", "size", "stride", "dim", "is_same_size",
        "_has_compatible_shallow_copy_type", "is_nonzero", "_nested_tensor_from_mask_left_aligned", "set_",
        "_to_copy", "clone", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "new_zeros",
        "new_ones", "new_full", "scalar_tensor", "matmul", "linear", "einsum", "dropout", "feature_dropout",
        "conv2d", "convolution", "_convolution", "layer_norm", "softmax", "group_norm", "batch_norm",
        "_batch_norm_impl_index", "instance_norm", "scaled_dot_product_attention", "unfold",
    )
)
_GEMM_AFTER_COPY = frozenset({"aten::addmm", "aten::baddbmm", "aten::addbmm", "aten::addmv"})


class OpCount(dict):
    """``{"aten_ops": int, "kernel_ops": int, "kernels": Counter}`` for one call."""

    @property
    def aten(self) -> int:
        return self["aten_ops"]

    @property
    def kernels(self) -> int:
        return self["kernel_ops"]


def _is_scalar_copy(event) -> bool:
    shapes = event.input_shapes or []
    return event.name == "aten::copy_" and len(shapes) >= 2 and all(len(s) == 0 for s in shapes[:2])


def count_ops(fn: Callable[[], object], warmup: bool = True) -> OpCount:
    """ATen operators and kernel-launching operators of one call of ``fn``.

    Args:
        fn: Runs the call (forward, or forward and backward).
        warmup: Run ``fn`` once before the counted call.

    Returns:
        An :class:`OpCount`; ``kernels`` is a ``Counter`` of kernel-launching
        operator names (for reading what a call runs).
    """
    if warmup:
        fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    launches: dict[int, bool] = {}

    def launch(event) -> bool:
        key = id(event)
        if key not in launches:
            own = event.name not in NO_KERNEL and not _is_scalar_copy(event)
            launches[key] = own or any(launch(c) for c in event.cpu_children if c.name.startswith("aten::"))
        return launches[key]

    kernels: Counter = Counter()
    for event in events:
        if event.name in NO_KERNEL or _is_scalar_copy(event):
            continue
        children = [c for c in event.cpu_children if c.name.startswith("aten::")]
        if not any(launch(c) for c in children):
            kernels[event.name] += 1  # innermost: this operator is the kernel
        elif event.name in _GEMM_AFTER_COPY:
            kernels[event.name] += 1  # the GEMM after the copy its profile shows
    return OpCount(aten_ops=len(events), kernel_ops=sum(kernels.values()), kernels=kernels)
