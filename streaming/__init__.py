"""The MiMo-Audio engine: model, audio tokenizer, checkpoint loading and the streaming session."""
