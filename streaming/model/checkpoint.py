"""Checkpoint folders in the official layout: ``config.json`` + (sharded) safetensors.

The state-dict key names are a contract with the official checkpoints: loading is strict, and a
missing key, an unexpected key or a wrong shape is an error that names the key. Tensors are read
memory-mapped, one at a time, and assigned into a module built on the ``meta`` device, so no full
extra copy of the weights is ever held in RAM.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from mimo_voice.configs.errors import CheckpointError
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def resolve_checkpoint_dir(path_or_repo: str | Path) -> Path:
    """A local folder as is; otherwise a Hugging Face repo id fetched through ``huggingface_hub``."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo)
    if path.exists() or text.count("/") != 1 or text.startswith(("/", ".", "~")):
        raise CheckpointError(f"checkpoint not found: {path_or_repo} is neither a folder nor a repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path_or_repo), allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as exc:  # the hub client raises many kinds; all mean "not available here"
        raise CheckpointError(
            f"could not fetch {path_or_repo} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "Download it on a machine with network access and pass the local folder instead."
        ) from exc


def read_config_json(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json")
    return json.loads(path.read_text(encoding="utf-8"))


def shard_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    single = folder / SINGLE_NAME
    if single.is_file():
        return [single]
    raise CheckpointError(f"{folder}: no {INDEX_NAME} or {SINGLE_NAME}")


def iter_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs, memory-mapped from every shard."""
    for shard in shard_files(folder):
        if not shard.is_file():
            raise CheckpointError(f"{folder}: shard {shard.name} listed in the index is missing")
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
                yield key, handle.get_tensor(key)


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(re.fullmatch(pattern, key) for pattern in patterns)


def load_weights(
    module: nn.Module,
    folder: Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    ignore_unexpected: Iterable[str] = (),
    keep_dtype: Iterable[str] = (),
) -> nn.Module:
    """Strictly load ``folder``'s tensors into ``module`` (which may live on ``meta``).

    ``ignore_unexpected``: regexes of checkpoint keys the model does not use (e.g. EMA buffers).
    ``keep_dtype``: regexes of keys kept in float32 whatever ``dtype`` is (e.g. RVQ codebooks).
    """
    expected = module.state_dict(keep_vars=True)
    loaded: dict[str, torch.Tensor] = {}
    for key, tensor in iter_tensors(folder):
        if key not in expected:
            if _matches(key, ignore_unexpected):
                continue
            raise CheckpointError(f"{folder}: unexpected key {key!r} (shape {list(tensor.shape)}) in the checkpoint")
        want = tuple(expected[key].shape)
        if tuple(tensor.shape) != want:
            raise CheckpointError(
                f"{folder}: key {key!r} has shape {list(tensor.shape)}, the model expects {list(want)}"
            )
        target = torch.float32 if _matches(key, keep_dtype) else dtype
        loaded[key] = tensor.to(device=device, dtype=target if tensor.is_floating_point() else tensor.dtype)
    missing = [key for key in expected if key not in loaded]
    if missing:
        raise CheckpointError(
            f"{folder}: missing key {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    module.load_state_dict(loaded, strict=True, assign=True)
    return module


def save_weights(
    state_dict: dict[str, torch.Tensor],
    folder: Path,
    *,
    max_shard_bytes: int = 2 * 1024**3,
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``state_dict`` as official-layout safetensors shards plus their index."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state_dict.items():
        tensor = tensor.detach().contiguous().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / SINGLE_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    total = 0
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2), encoding="utf-8")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)
