"""Benchmarks of the engine and the audio tokenizer (`mimo-voice bench engine|codec`), and their report helpers."""
