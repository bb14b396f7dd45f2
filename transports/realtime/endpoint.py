"""``WS /v1/realtime``: admission (bearer token, session slots) and the pipeline of one Realtime connection.

The key comes as ``Authorization: Bearer <key>`` (SDKs, pipecat, LiveKit) or, from browsers, as the subprotocol
``openai-insecure-api-key.<key>``; the connection is then accepted with the subprotocol ``realtime``. A wrong key
gets HTTP 401 and a full server HTTP 503, both before the upgrade. The pipeline is the agent's own
(``agent.pipeline.create_worker``) with the Realtime processors (client_events.py, responses.py) around the service.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse
from loguru import logger
from mimo_voice.agent.pipeline import create_worker
from mimo_voice.agent.vad import create_vad_analyzer, vad_params
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
from pipecat.workers.runner import WorkerRunner

from ..metrics import TurnMetricsObserver
from ..sessions import Refused
from .client_events import RealtimeInput
from .responses import RealtimeOutput
from .serializer import AudioFormats, RealtimeSerializer
from .session import RealtimeState, SwitchableVAD, initial_config

if TYPE_CHECKING:
    from ..sessions import SessionHub, TransportName

TRANSPORT_NAME: TransportName = "realtime"
BROWSER_KEY_PREFIX = "openai-insecure-api-key."


def add_realtime_route(app: FastAPI, hub: SessionHub) -> None:
    """Serve ``/v1/realtime`` on ``app``. Live connections are in ``app.state.realtime`` by session id."""
    app.state.realtime = {}

    @app.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket, model: str | None = None) -> None:
        await serve(websocket, hub, model, app.state.realtime)


def offered_key(websocket: WebSocket) -> str | None:
    scheme, _, token = websocket.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    for protocol in websocket.scope.get("subprotocols", []):
        if protocol.startswith(BROWSER_KEY_PREFIX):
            return protocol.removeprefix(BROWSER_KEY_PREFIX)
    return None


async def _refuse(websocket: WebSocket, status: int, code: str, message: str) -> None:
    body = {"error": {"type": "invalid_request_error", "code": code, "message": message}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    await websocket.send_denial_response(JSONResponse(body, status_code=status, headers=headers))


async def serve(websocket: WebSocket, hub: SessionHub, model: str | None, live: dict[str, RealtimeState]) -> None:
    """One Realtime connection, from the upgrade to the end of its pipeline."""
    expected = websocket.app.state.auth_token
    key = offered_key(websocket)
    if expected is not None and not (key and secrets.compare_digest(key.encode(), expected.encode())):
        hub.metrics.sessions_refused.inc("unauthorized")
        await _refuse(websocket, 401, "invalid_api_key", "missing or wrong API key (Authorization: Bearer <key>)")
        return
    refusal = hub.gate.refusal()  # draining, or the engine loading or down
    if refusal is not None:
        hub.metrics.sessions_refused.inc(refusal.status)
        await _refuse(websocket, 503, refusal.status, refusal.detail)
        return
    if hub.engine is None:
        await _refuse(websocket, 503, "no_model", "this server has no model loaded")
        return
    client = websocket.client.host if websocket.client else None
    try:
        with hub.handshake():
            reservation = hub.reserve(TRANSPORT_NAME, client=client)
    except Refused as refused:
        await _refuse(websocket, refused.status, refused.reason, refused.message)
        return
    state = _new_state(hub, model)
    live[state.config.id] = state
    try:
        offered = websocket.scope.get("subprotocols", [])
        await websocket.accept(subprotocol="realtime" if "realtime" in offered else None)
        logger.info(f"session {reservation.id} (realtime, model {model!r}) started")
        await _run(websocket, hub, state)
    finally:
        live.pop(state.config.id, None)
        hub.release(reservation)


def _new_state(hub: SessionHub, model: str | None) -> RealtimeState:
    config = hub.config
    formats = AudioFormats()
    vad = SwitchableVAD(create_vad_analyzer(config.vad))
    return RealtimeState(
        config=initial_config(config, model), formats=formats, vad=vad, vad_params=vad_params(config.vad)
    )


def _wants_beta(websocket: WebSocket) -> bool:
    return "realtime=v1" in websocket.headers.get("openai-beta", "")


async def _run(websocket: WebSocket, hub: SessionHub, state: RealtimeState) -> None:
    transport = FastAPIWebsocketTransport(
        websocket,
        FastAPIWebsocketParams(
            audio_in_enabled=True,
            audio_out_enabled=True,
            add_wav_header=False,
            serializer=RealtimeSerializer(state.formats, beta=_wants_beta(websocket), done=state.done_sent),
        ),
    )
    # One response per response.create: no separate spoken acknowledgement before a thinking answer.
    agent = hub.config.agent.model_copy(update={"thinking_acknowledgement": False})
    config = hub.config.model_copy(update={"agent": agent})
    worker, service = create_worker(
        transport,
        config,
        hub.engine,
        vad_analyzer=state.vad,
        observers=[TurnMetricsObserver(hub.metrics, TRANSPORT_NAME)],
        input_processors=[RealtimeInput(state)],
        output_processors=[RealtimeOutput(state)],
    )
    state.service = service

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(_transport: Any, _client: Any) -> None:
        await worker.cancel(reason="client disconnected")

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()
