"""Counting the ATen ops a piece of model code dispatches (what becomes kernel launches on a GPU),
and separately its host reads of tensor values (each one a device sync on a GPU).

A host read shows as ``aten::_local_scalar_dense``, or, under ``torch.inference_mode``, as the
``aten::item`` / ``aten::is_nonzero`` that wrap it (the mode sees the outer op only); ``nonzero``
(boolean-mask indexing) also waits for the device. ``Tensor.tolist()`` bypasses the dispatcher and
is not seen: callers that read results that way count those reads themselves."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

HOST_READS = frozenset(f"aten::{name}" for name in ("_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal"))


@dataclass
class OpCounts:
    ops: int = 0  # every ATen op, host reads included
    host_reads: int = 0
    by_name: Counter[str] = field(default_factory=Counter)

    def __add__(self, other: OpCounts) -> OpCounts:
        return OpCounts(self.ops + other.ops, self.host_reads + other.host_reads, self.by_name + other.by_name)

    def per(self, calls: int) -> dict[str, float]:
        return {"aten_ops": self.ops / calls, "host_reads": self.host_reads / calls}


class _CountingMode(TorchDispatchMode):
    def __init__(self, counts: OpCounts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = f"aten::{func.overloadpacket.__name__}"
        self.counts.ops += 1
        self.counts.by_name[name] += 1
        if name in HOST_READS:
            self.counts.host_reads += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def count_ops() -> Iterator[OpCounts]:
    """``with count_ops() as counts: ...``: the ATen ops dispatched inside the block."""
    counts = OpCounts()
    with _CountingMode(counts):
        yield counts


def count_call(fn: Callable[[], Any]) -> tuple[Any, OpCounts]:
    """Run ``fn()`` once under :func:`count_ops`; returns its result and the counts."""
    with count_ops() as counts:
        result = fn()
    return result, counts
