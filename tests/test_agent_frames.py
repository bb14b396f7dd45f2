"""MiMoAudioService driven by a front-end's frames (agent/frames.py) instead of VAD: client-driven turns, answers
with instructions, cancellation to a played position, new instructions, and where a tool call shows in the frames.
A scripted session stands in for the engine."""

from __future__ import annotations

from agent_harness import Agent, spoken, tone, tool_call, wait_until
from mimo_voice.agent.frames import CancelResponseFrame, EndUserTurnFrame, RespondFrame, StartUserTurnFrame
from mimo_voice.agent.service import TOOL_CALL_METADATA
from pipecat.frames.frames import FunctionCallInProgressFrame, LLMFullResponseEndFrame
from pipecat.services.llm_service import FunctionCallParams


async def test_a_client_driven_turn_waits_for_respond_and_takes_its_instructions():
    async with Agent([spoken(["Hi"])]) as agent:
        await agent.harness.send(StartUserTurnFrame())
        await agent.send_audio(tone(0.4))
        await agent.harness.send(EndUserTurnFrame(respond=False))
        await agent.harness.send(RespondFrame(instructions="Answer in French."))
        await agent.responses_done()
    session = agent.session
    assert [c[0] for c in session.calls if c[0] != "feed_audio"] == ["add_text", "respond"]
    assert session.called("add_text") == [("add_text", "system", "Answer in French.")]
    assert session.called("respond")[0][1] == int(0.4 * 16_000)  # every sample of the turn, no VAD pre-roll needed


async def test_auto_respond_off_ends_vad_turns_without_answering():
    async with Agent([spoken(["Hi"])]) as agent:
        agent.service.auto_respond = False
        await agent.user_says()
        await agent.harness.send(RespondFrame())
        await agent.responses_done()
    assert len(agent.session.called("respond")) == 1


async def test_cancel_to_a_played_position_rolls_back_a_finished_answer():
    async with Agent([spoken(["One", " two", " three"])]) as agent:
        await agent.harness.send(RespondFrame())
        await agent.responses_done()
        await agent.played_out()
        await agent.harness.send(CancelResponseFrame(played_samples=1234))
        await wait_until(lambda: bool(agent.session.called("cancel")), what="the cancel")
    assert agent.session.called("cancel") == [("cancel", 1234)]


async def test_new_instructions_restart_an_untouched_session_and_join_a_running_one():
    async with Agent([spoken(["Hi"])]) as agent:
        tool = {"name": "get_weather", "description": "The weather.", "parameters": {"type": "object"}}
        await agent.service.set_instructions("Be brief.", [tool])
        prompt = agent.engine.opened[-1]["system_prompt"]
        assert len(agent.engine.opened) == 2 and prompt.startswith("Be brief.") and "get_weather" in prompt
        await agent.harness.send(RespondFrame())
        await agent.responses_done()
        await agent.service.set_instructions("Be chatty.")
    assert len(agent.engine.opened) == 2
    (note,) = agent.session.called("add_text")
    assert note[1] == "system" and note[2].startswith("Be chatty.") and "get_weather" in note[2]


async def test_a_tool_call_is_named_on_the_end_of_its_response_and_follows_it():
    async def client_side(params: FunctionCallParams) -> None:
        """Like a Realtime client's function: the result comes later, from elsewhere."""

    raw = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    async with Agent([tool_call(raw, ack=["Let", " me", " see"])]) as agent:
        agent.service.register_function("get_weather", client_side)
        await agent.harness.send(RespondFrame())
        await wait_until(lambda: bool(agent.pushed(FunctionCallInProgressFrame)), what="the call")
    end = agent.pushed(LLMFullResponseEndFrame)[0]
    call = agent.pushed(FunctionCallInProgressFrame)[0]
    assert end.metadata[TOOL_CALL_METADATA] == call.tool_call_id and call.arguments == {"city": "Oslo"}
    pushed = [frame for _source, frame, _direction in agent.harness.log.pushes]
    assert pushed.index(end) < pushed.index(call)
