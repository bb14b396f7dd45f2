"""Embedded model presets: the tiny model, trained on first use so that it babbles in the official format."""
