"""Shared fixtures, and the test tiers: every test is marked ``unit``, ``engine`` or ``e2e`` by its module.

- ``e2e``: a real server with WebRTC, phone or browser clients, or ``bench live``;
- ``engine``: loads the tiny engine (a worker process with the trained tiny preset), or uses a fixture that does;
- ``unit``: everything else (no engine process; small models built in memory at most).

``scripts/dev test -m unit`` runs the fast tier.
"""

import pytest

E2E_MODULES = {  # a real server (in-process or a subprocess), bench live, or a Ray cluster
    "test_transports_browser",
    "test_transports_webrtc",
    "test_transports_twilio",
    "test_transports_drain",
    "test_transports_supervision",
    "test_realtime_turns",
    "test_realtime_options",
    "test_realtime_pipecat",
    "test_bench_live",
    "test_bench_soak",
    "test_ray_pool",
}
ENGINE_MODULES = {
    "test_engine",
    "test_engine_bench",
    "test_session_turns",
    "test_session_cache",
    "test_session_context",
    "test_agent_engine",
    "test_tiny_answers",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks each test's tier by its module, and skips tests marked ``cuda`` where torch sees no CUDA device
    (scripts/gpu-check runs them)."""
    import torch

    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        module = item.module.__name__ if item.module else ""
        if module in E2E_MODULES:
            item.add_marker(pytest.mark.e2e)
        elif module in ENGINE_MODULES or "tiny_engine" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.engine)
        else:
            item.add_marker(pytest.mark.unit)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Fails the run where ``--dist loadgroup`` ignores ``xdist_group`` marks (as pytest-xdist 3.8 does under pytest
    9.2): tests that must not share the CPU or a Ray cluster would silently run side by side."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    ungrouped = [
        item.nodeid for item in session.items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid
    ]
    if ungrouped:
        raise pytest.UsageError(f"--dist loadgroup ignored the xdist_group mark of {ungrouped[0]} (check pytest-xdist)")


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
    """The embedded default on CPU/float32, ``TestingEngine.load(cpu_config(None))``: the tiny preset trained on the
    output format (built once into the cache, ~/.cache/mimo-voice). Shared: close the sessions you open, change no
    config."""
    import asyncio

    from mimo_voice.streaming.engine.testing import TestingEngine
    from session_support import cpu_config

    engine = TestingEngine.load(cpu_config(None))
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
