"""The OpenAI-compatible server: HTTP routes over an engine thread with continuous batching."""
