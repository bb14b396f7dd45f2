"""The MiMo-Audio engine: the model (model/), the serving engine (engine/), presets and benchmarks."""
