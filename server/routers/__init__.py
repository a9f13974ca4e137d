"""One router per endpoint group, as in vLLM's ``entrypoints/openai``."""
