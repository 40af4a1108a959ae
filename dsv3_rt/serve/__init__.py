"""The OpenAI-compatible server: HTTP routes and an engine task on one event loop (continuous batching)."""
