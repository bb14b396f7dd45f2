"""``bench engine --profile-ops``: ATen ops per audio group, by part, counted with a ``TorchDispatchMode``.

On a GPU each ATen op is at least one kernel launch, and ``aten::_local_scalar_dense`` (``.item()``,
``bool(tensor)``, ``.tolist()``) is a host-device sync, so these counts are what the step costs a GPU in
launches and syncs, measured on any device. The engine's worker is built in this process (its real step
phase, on a reply with audio forced at every position) and the counts are split by part: patch decoder,
patch encoder, streaming decode, and the rest of the step (backbone, text head, sampling, bookkeeping).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mimo_voice.configs import Config
from torch.utils._python_dispatch import TorchDispatchMode

PARTS = ("LLM step", "patch decoder", "patch encoder", "decode")
HOST_READ = "aten._local_scalar_dense"  # an OpOverloadPacket name: overload objects are not unique


class OpCounter(TorchDispatchMode):
    """Counts every ATen op dispatched while active, under the current part's name."""

    def __init__(self) -> None:
        super().__init__()
        self.part = PARTS[0]
        self.ops: Counter[str] = Counter()
        self.host_reads: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[self.part] += 1
        if str(func.overloadpacket) == HOST_READ:
            self.host_reads[self.part] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> OpCounter:
        # ``tolist`` reads a CPU tensor's memory without dispatching an op (a CUDA tensor's goes through a copy):
        # counted here as the host read it is on a GPU.
        self._tolist = torch.Tensor.tolist
        counter, tolist = self, self._tolist

        def counted_tolist(tensor: torch.Tensor) -> Any:
            counter.host_reads[counter.part] += 1
            return tolist(tensor)

        torch.Tensor.tolist = counted_tolist  # type: ignore[method-assign,assignment]
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]
        super().__exit__(*exc)

    @contextlib.contextmanager
    def labelled(self, part: str) -> Iterator[None]:
        outer, self.part = self.part, part
        try:
            yield
        finally:
            self.part = outer

    def wrap(self, owner: Any, name: str, part: str) -> None:
        """Counts the ops of ``owner.name(...)`` (an instance's method, shadowed on the instance) under ``part``."""
        method = getattr(owner, name)

        @functools.wraps(method)
        def labelled(*args: Any, **kwargs: Any) -> Any:
            with self.labelled(part):
                return method(*args, **kwargs)

        setattr(owner, name, labelled)


class _Outbox:
    """Stands in for the worker's pipe: events are dropped, the bench reads the counts."""

    def send(self, message: Any) -> None:
        pass


def checkpoint_paths(config: Config) -> tuple[Path, Path]:
    from mimo_voice.streaming.engine.engine import OFFICIAL_TOKENIZER_REPO
    from mimo_voice.streaming.model.checkpoint import resolve_checkpoint_dir

    if config.model.path is None:
        from mimo_voice.streaming.presets.tiny_training import ensure_preset_checkpoints

        return ensure_preset_checkpoints(config.model.preset, config.model.cache_dir)
    return resolve_checkpoint_dir(config.model.path), resolve_checkpoint_dir(
        config.model.tokenizer_path or OFFICIAL_TOKENIZER_REPO
    )


def profile_ops(
    config: Config, user_audio: np.ndarray, rate: int, script: Callable[[list[int]], int | None]
) -> dict[str, Any]:
    """One reply after ``user_audio``, forced by the text hook ``script``: ops and host reads per audio group,
    by part. A first reply, not counted, makes what a worker makes once (the patch decoder's cache and buffers)."""
    from mimo_voice.streaming.engine.conversation import Conversation
    from mimo_voice.streaming.engine.worker import Worker

    llm_path, codec_path = checkpoint_paths(config)
    worker = Worker(config, llm_path, codec_path, None, _Outbox())  # type: ignore[arg-type]
    conversation = Conversation(worker, 1, task="spoken_dialogue", system_prompt=None)
    conversation.text_hook = script
    counter = OpCounter()
    counter.wrap(worker.fast, "decode_patch", "patch decoder")
    counter.wrap(worker.fast, "embed_patches", "patch encoder")
    counter.wrap(worker.scheduler, "_decode_audio", "decode")  # the codec and the PCM's way out
    # no_grad rather than the worker's inference_mode: under inference_mode, bool(tensor) and .item() dispatch
    # is_nonzero/item instead of decomposing to _local_scalar_dense, which would hide the host reads.
    with torch.no_grad():
        for counted in (False, True):
            conversation.feed_audio(user_audio, rate)
            conversation.respond("non_thinking", time.perf_counter(), 1)
            generation = conversation.generation
            assert generation is not None, "respond() did not start a response"
            with counter if counted else contextlib.nullcontext():
                while worker.active:
                    worker._step_all()
    assert generation is not None
    groups = generation.released_patches
    conversation.close()
    per_group = {part: counter.ops[part] / groups for part in PARTS}
    reads = {part: counter.host_reads[part] / groups for part in PARTS}
    return {
        "groups": groups,
        "ops_per_group": per_group,
        "host_reads_per_group": reads,
        "ops_per_group_total": sum(per_group.values()),
        "host_reads_per_group_total": sum(reads.values()),
    }
