"""Serving: the engine (fixed KV rows, JetStream-style), the scheduler, and an OpenAI-compatible HTTP server."""
