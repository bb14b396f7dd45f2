"""MiMo-Audio in PyTorch, in the official checkpoint layout: the LLM, the audio tokenizer, checkpoints, tokenizers,
sampling and audio helpers. Imports nothing from the engine, the agent, transports or configs."""
