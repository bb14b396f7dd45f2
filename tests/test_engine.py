"""The engine: one worker process shared by sessions, a loop that never waits on it, the tiny preset."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
import wave

import numpy as np
import pytest
import torch
from mimo_voice.configs import load_config
from mimo_voice.configs.errors import EngineClosed
from mimo_voice.streaming.engine.engine import Engine, read_voice_prompt
from mimo_voice.streaming.engine.events import AudioPatch
from mimo_voice.streaming.engine.protocol import Inspect
from mimo_voice.streaming.engine.testing import TestingEngine
from mimo_voice.streaming.model.checkpoint import CheckpointError
from mimo_voice.streaming.model.configuration_mimo_audio import MiMoAudioConfig
from mimo_voice.streaming.model.modeling_mimo_audio import MiMoAudioForCausalLM
from mimo_voice.streaming.presets import tiny_training
from session_support import (
    Script,
    break_feeding,
    collect,
    end_of,
    generating,
    mend_feeding,
    of,
    opened,
    patches_of,
    speech,
    voice,
    voice_prompt_part,
)


async def test_generation_never_stalls_the_event_loop(tiny_engine):
    """A loop-lag probe: a task that sleeps 5 ms over and over measures how late it wakes up."""
    lags: list[float] = []
    done = asyncio.Event()

    async def probe() -> None:
        while not done.is_set():
            began = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - began - 0.005)

    task = asyncio.create_task(probe())
    async with opened(tiny_engine) as session:
        session.text_hook = Script(speech(tiny_engine, "A reply long enough to measure.", 40))
        await session.feed_audio(voice(3.0), 16_000)  # encoded and prefilled on the worker too
        events = await collect(session.respond())
    done.set()
    await task
    assert end_of(events).reason == "stop" and len(of(events, AudioPatch)) == 40
    assert len(lags) > 20
    assert max(lags) < 0.050, f"the event loop stalled for {max(lags) * 1000:.0f} ms"


async def test_sessions_share_the_engine_step_by_step_without_sharing_state(tiny_engine):
    script = speech(tiny_engine, "Same words for both of us.", 15)
    async with opened(tiny_engine) as first, opened(tiny_engine) as second:
        for session in (first, second):
            session.text_hook = Script(script)
            await session.feed_audio(voice(1.0), 16_000)
        a, b = await asyncio.gather(collect(first.respond()), collect(second.respond()))
    assert end_of(a).reason == end_of(b).reason == "stop"
    # Interleaved: each response was under way before the other one ended.
    assert of(a, AudioPatch)[0].time < end_of(b).time and of(b, AudioPatch)[0].time < end_of(a).time
    # Same seed, same input, separate caches and generators: the same patches.
    assert all(np.array_equal(x, y) for x, y in zip(patches_of(a), patches_of(b), strict=True))


@pytest.fixture
def own_engine():
    """An engine (worker process) of its own, for tests that stop or break it."""
    engine = TestingEngine.load(load_config(None))
    yield engine
    asyncio.run(engine.aclose())


async def test_closing_the_engine_ends_a_response_in_progress(own_engine):
    session = own_engine.new_session()
    session.text_hook = Script([own_engine.special.empty] * 500)
    await session.feed_audio(voice(0.5), 16_000)
    events = []
    async for event in session.respond():
        events.append(event)
        if isinstance(event, AudioPatch) and len(events) == 3:
            await own_engine.aclose()
    assert end_of(events).reason == "cancelled"
    with pytest.raises(EngineClosed):
        await session.feed_audio(voice(0.1), 16_000)


async def test_a_worker_that_dies_ends_the_response_with_an_error(own_engine):
    session = own_engine.new_session()
    session.text_hook = Script([own_engine.special.empty] * 500)
    await session.feed_audio(voice(0.5), 16_000)
    events = []
    async for event in session.respond():
        events.append(event)
        if isinstance(event, AudioPatch) and len(events) == 3:
            own_engine._process.kill()
    assert end_of(events).reason == "error" and "worker process ended" in end_of(events).error
    with pytest.raises(EngineClosed):
        await session.add_text("system", "anyone there?")
    assert await asyncio.wait_for(own_engine.wait_closed(), 10) == -9
    assert not own_engine.is_alive() and own_engine.exit_code == -9


async def test_the_worker_reports_progress_while_it_generates(tiny_engine):
    async with opened(tiny_engine) as session:
        await session.caught_up()
        assert not tiny_engine.has_pending_work
        steps_before = tiny_engine.worker_steps
        session.text_hook = Script(speech(tiny_engine, "Counting the steps.", 12))
        await session.feed_audio(voice(0.5), 16_000)
        pending, progress = [], []
        async for _event in session.respond():
            pending.append(tiny_engine.has_pending_work)
            progress.append(tiny_engine.last_progress)
        assert all(pending[:-1]) and progress == sorted(progress) and progress[-1] > progress[0]
        await session.caught_up()  # the idle heartbeat was sent before this call's answer
        assert not tiny_engine.has_pending_work and tiny_engine.worker_steps >= steps_before + 12
        assert tiny_engine.is_alive() and tiny_engine.exit_code is None


async def test_a_production_engine_keeps_the_test_hooks_out():
    engine = Engine.load(load_config(None))
    try:
        session = engine.new_session()
        assert not hasattr(session, "text_hook") and not hasattr(session, "inspect")
        refused = engine.call(Inspect(session_id=session._id, function=len))
        with pytest.raises(PermissionError, match="testing engine"):
            await asyncio.wrap_future(refused)
        await session.close()
    finally:
        await engine.aclose()
    assert await engine.wait_closed() == 0 and not engine.is_alive()


async def test_a_reader_that_leaves_early_stops_the_generation(tiny_engine):
    async with opened(tiny_engine) as session:
        session.text_hook = Script([tiny_engine.special.empty] * 300)
        await session.feed_audio(voice(0.5), 16_000)
        stream = session.respond()
        async for event in stream:
            if isinstance(event, AudioPatch):
                break
        await stream.aclose()
        assert not await session.inspect(generating)
        session.text_hook = Script(speech(tiny_engine, "Hi.", 5))
        await session.feed_audio(voice(0.5), 16_000)
        assert end_of(await collect(session.respond())).reason == "stop"  # usable again


async def test_a_voice_prompt_opens_every_conversation(tmp_path):
    path = tmp_path / "voice.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(16_000)
        wav.writeframes(np.repeat(voice(1.0), 2).tobytes())
    prompt = read_voice_prompt(path)
    assert prompt.dtype == np.float32 and abs(len(prompt) - 24_000) <= 1
    engine = TestingEngine.load(load_config(None, [f"agent.voice_prompt_wav={path}"]))
    try:
        async with opened(engine) as session:
            voice_part = await session.inspect(voice_prompt_part)
            patches = torch.stack([codes for _, codes in voice_part if codes is not None])
            assert len(patches) == 7  # 1 s = 26 code frames -> 7 patches
            assert [text_id for text_id, _ in voice_part] == engine.builder.voice_prompt(patches).text_ids.tolist()
            session.text_hook = Script(speech(engine, "Hi.", 5))
            await session.feed_audio(voice(0.5), 16_000)
            assert end_of(await collect(session.respond())).reason == "stop"
    finally:
        await engine.aclose()
    (tmp_path / "bad.wav").write_bytes(b"not a wav file")
    with pytest.raises(ValueError, match="voice prompt"):
        read_voice_prompt(tmp_path / "bad.wav")


def test_a_checkpoint_that_does_not_load_is_a_clear_error(tmp_path):
    llm, codec = tiny_training.ensure_preset_checkpoints("tiny")
    broken = tmp_path / "llm"
    shutil.copytree(llm, broken)
    config = json.loads((broken / "config.json").read_text())
    config["local_layers"] += 1  # the model now wants a patch-decoder layer the checkpoint lacks
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing key 'local_transformer.layers"):
        Engine.load(load_config(None, [f"model.path={broken}", f"model.tokenizer_path={codec}"]))


def test_the_embedded_preset_is_built_once_across_processes_and_threads(tmp_path, monkeypatch):
    builds = []

    def fake_build(folder, preset, recipe):
        builds.append(preset)
        time.sleep(0.2)  # long enough for the other caller to reach the lock
        (folder / "llm").mkdir(parents=True)
        (folder / "tokenizer").mkdir()

    monkeypatch.setattr(tiny_training, "_build", fake_build)
    results = []

    def build() -> None:
        results.append(tiny_training.ensure_preset_checkpoints("tiny", tmp_path))

    callers = [threading.Thread(target=build) for _ in range(3)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert builds == ["tiny"] and len(set(results)) == 1 and results[0][0].is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    other = tiny_training.ensure_preset_checkpoints("tiny", tmp_path, tiny_training.Recipe(steps=1))
    assert other != results[0] and builds == ["tiny", "tiny"]  # another recipe, another cache entry
    third = tiny_training.ensure_preset_checkpoints("tiny", tmp_path, tiny_training.Recipe(steps=2))
    kept = {p for p in tmp_path.iterdir() if p.is_dir()}
    assert kept == {other[0].parent, third[0].parent}  # the oldest build was pruned


def test_the_offset_head_starts_out_looking_four_positions_back():
    from mimo_voice.streaming.model.text_tokenizer import SpecialTokens

    special = SpecialTokens(*range(151665, 151674))
    model = MiMoAudioForCausalLM.random(MiMoAudioConfig.tiny(), special)
    tiny_training._seed_offset_head(model, offset=4, strength=5.0)
    attention = model.model.layers[0].self_attn
    positions = torch.arange(24)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, 24, 64), positions)
    q = attention.q_proj.bias[:16] * cos[0] + _rotate_half(attention.q_proj.bias[:16]) * sin[0]
    k = attention.k_proj.bias[:16] * cos[0] + _rotate_half(attention.k_proj.bias[:16]) * sin[0]
    scores = q[-1] @ k[:-1].T  # the last position attending to the 23 before it, by bias alone
    assert int(scores.argmax()) == 23 - 4


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]], dim=-1)


async def test_respond_reports_a_bad_feed_as_an_error_turn(tiny_engine):
    async with opened(tiny_engine) as session:
        await session.inspect(break_feeding)
        try:
            await session.feed_audio(voice(0.5), 16_000)
            events = await collect(session.respond())
        finally:
            await session.inspect(mend_feeding)
        assert len(events) == 1 and end_of(events).reason == "error" and "encoder exploded" in end_of(events).error
        session.text_hook = Script(speech(tiny_engine, "Fine now.", 5))
        await session.feed_audio(voice(0.5), 16_000)
        assert end_of(await collect(session.respond())).reason == "stop"
