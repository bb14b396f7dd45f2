"""The outer edge: the HTTP/WebRTC server and page, the phone websocket, the command line, bench live."""
