"""Checkpoint loading: sharded safetensors, strict key and shape checks with clear errors."""

import json

import pytest
import torch
from mimo_voice.streaming.model.checkpoint import CheckpointError, load_weights, resolve_checkpoint_dir, save_weights
from torch import nn


def _module() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))


def test_sharded_round_trip_into_meta_module(tmp_path):
    source = _module()
    save_weights(source.state_dict(), tmp_path, max_shard_bytes=40)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    with torch.device("meta"):
        target = _module()
    load_weights(target, tmp_path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_missing_unexpected_and_wrong_shape_name_the_key(tmp_path):
    state = _module().state_dict()
    save_weights({k: v for k, v in state.items() if k != "1.bias"}, tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"missing key '1\.bias'"):
        load_weights(_module(), tmp_path / "missing")
    save_weights({**state, "2.extra": torch.zeros(1)}, tmp_path / "extra")
    with pytest.raises(CheckpointError, match=r"unexpected key '2\.extra'"):
        load_weights(_module(), tmp_path / "extra")
    load_weights(_module(), tmp_path / "extra", ignore_unexpected=[r"2\..*"])
    save_weights({**state, "0.weight": torch.zeros(3, 5)}, tmp_path / "shape")
    with pytest.raises(CheckpointError, match=r"'0\.weight' has shape \[3, 5\]"):
        load_weights(_module(), tmp_path / "shape")


def test_every_problem_is_reported_at_once(tmp_path):
    state = _module().state_dict()
    broken = {k: v for k, v in state.items() if k not in ("1.bias", "1.weight")}
    save_weights({**broken, "0.weight": torch.zeros(3, 5), "2.extra": torch.zeros(1)}, tmp_path)
    with pytest.raises(CheckpointError, match=r"4 problems") as error:
        load_weights(_module(), tmp_path)
    message = str(error.value)
    for part in ("missing key '1.bias'", "missing key '1.weight'", "unexpected key '2.extra'", "'0.weight' has shape"):
        assert part in message
    assert "missing key '0.weight'" not in message  # present, only misshapen


def test_derived_rotary_buffers_are_skipped_with_a_warning(tmp_path):
    from loguru import logger

    source = _module()
    save_weights({**source.state_dict(), "model.rotary_emb.inv_freq": torch.ones(4)}, tmp_path)
    warnings: list[str] = []
    sink = logger.add(warnings.append, level="WARNING")
    try:
        loaded = load_weights(_module(), tmp_path)
    finally:
        logger.remove(sink)
    assert torch.equal(loaded[0].weight, source[0].weight)
    assert any("rotary_emb.inv_freq" in line and "computed from the config" in line for line in warnings)


def test_dtype_conversion_and_kept_float32(tmp_path):
    save_weights(_module().state_dict(), tmp_path)
    module = load_weights(_module(), tmp_path, dtype=torch.bfloat16, keep_dtype=[r"1\..*"])
    assert module[0].weight.dtype == torch.bfloat16 and module[1].weight.dtype == torch.float32


def test_unresolvable_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="neither a folder nor a repo id"):
        resolve_checkpoint_dir(tmp_path / "a" / "b" / "c")
    with pytest.raises(CheckpointError, match="neither a folder nor a repo id"):
        resolve_checkpoint_dir("/nonexistent")
