"""The voice agent: a pipecat service that turns frames into MiMo-Audio session calls."""
