"""`mimo-voice bench live`: simulated WebRTC callers against a real server, and what they heard."""
