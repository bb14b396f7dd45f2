"""Tool registry and built-in tools (langchain-core tools and pipecat function schemas)."""
