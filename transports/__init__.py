"""WebRTC server and page, phone websocket, VAD analyzers."""
