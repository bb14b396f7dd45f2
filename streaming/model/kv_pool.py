"""A preallocated static KV cache for the backbone, shared by every session an engine serves: each
session holds one slot (a row of every layer's K and V) for the life of its conversation."""

from __future__ import annotations

import torch
from torch import Tensor

from .configuration_mimo_audio import MiMoAudioConfig


class KVPool:
    """Per layer K and V of [slots, kv_heads, capacity, head_dim] in the model dtype, plus each slot's
    length: kept on the CPU as ints (shapes and positions are decided there, with no host sync) and
    mirrored in a device tensor. K and V live in one tensor [layers, slots, 2 * kv_heads, capacity,
    head_dim] (keys first), so that a new position's keys and values are written with one op."""

    def __init__(
        self,
        config: MiMoAudioConfig,
        slots: int,
        capacity: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        if slots < 1 or capacity < 1:
            raise ValueError(f"a KV pool needs at least one slot and one position, got {slots} x {capacity}")
        self.config = config
        self.slots, self.capacity = slots, capacity
        self.device, self.dtype = torch.device(device), dtype
        kv_heads = config.num_key_value_heads
        shape = (config.num_hidden_layers, slots, 2 * kv_heads, capacity, config.head_dim)
        self.kv = torch.zeros(shape, device=self.device, dtype=dtype)
        self.keys, self.values = self.kv[:, :, :kv_heads], self.kv[:, :, kv_heads:]
        self._layers = list(self.kv.unbind(0))  # made once: a step reads them without a select op
        self.lengths_device = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._lengths = [0] * slots
        self._free = set(range(slots))

    def allocate(self) -> int:
        """The lowest free slot (so that live slots stay packed: a contiguous run is attended without a copy)."""
        if not self._free:
            raise RuntimeError(f"all {self.slots} KV slots are in use")
        slot = min(self._free)
        self._free.remove(slot)
        self._set_length(slot, 0)
        return slot

    def free(self, slot: int) -> None:
        self._check_live(slot)
        self._free.add(slot)
        self._set_length(slot, 0)

    def length(self, slot: int) -> int:
        self._check_live(slot)
        return self._lengths[slot]

    def lengths(self, slots: list[int]) -> list[int]:
        return [self.length(slot) for slot in slots]

    def truncate(self, slot: int, length: int) -> None:
        """Roll back: keep the first ``length`` positions (later ones are overwritten by the next appends)."""
        if not 0 <= length <= self.length(slot):
            raise ValueError(f"cannot truncate slot {slot} of {self._lengths[slot]} positions to {length}")
        self._set_length(slot, length)

    def room(self, slot: int) -> int:
        return self.capacity - self.length(slot)

    def _advance(self, slots: list[int], count: int) -> None:
        for slot in slots:
            self._lengths[slot] += count
        index = torch.tensor(slots, dtype=torch.long).to(self.device, non_blocking=True)
        self.lengths_device.index_add_(0, index, torch.full_like(index, count))

    def _set_length(self, slot: int, length: int) -> None:
        self._lengths[slot] = length
        self.lengths_device[slot] = length

    def _check_live(self, slot: int) -> None:
        if not 0 <= slot < self.slots or slot in self._free:
            raise ValueError(f"slot {slot} is not allocated")

    def layer(self, index: int) -> Tensor:
        """Layer ``index``'s K and V: [slots, 2 * kv_heads, capacity, head_dim]."""
        return self._layers[index]
