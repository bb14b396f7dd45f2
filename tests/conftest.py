"""Shared fixtures. Several test modules add session-scoped tiny checkpoints here."""

import pytest


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory):
    """A random (seed 0) `tiny` MiMo-Audio LLM checkpoint in the official layout: config.json,
    sharded safetensors + index, tokenizer.json/tokenizer_config.json. Treat it as read-only."""
    from mimo_voice.streaming.model.modeling_mimo_audio import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llm"))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A random (seed 0) `tiny` MiMo-Audio-Tokenizer checkpoint in the official layout (config.json +
    model.safetensors with every official key, EMA buffers included). Treat it as read-only."""
    from mimo_voice.streaming.model.modeling_audio_tokenizer import write_tiny_tokenizer

    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_engine():
    """The embedded default, ``TestingEngine.load(load_config(None))``: the tiny preset trained on the output format
    (built once into the cache, ~/.cache/mimo-voice). Shared: close the sessions you open, change no config."""
    import asyncio

    from mimo_voice.configs import load_config
    from mimo_voice.streaming.engine.testing import TestingEngine

    engine = TestingEngine.load(load_config(None))
    yield engine
    asyncio.run(engine.aclose())


@pytest.fixture(scope="module")
def torch_single_thread():
    """One torch thread for the module: on a shared 2-core machine, OpenMP threads that wait for each other under
    load make small-tensor code 20-50x slower. Restores the previous setting afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
