"""Runs in the API server process: vLLM's OpenAI app with this project's routes, middleware and
Prometheus exporter. Talks to the engine only through vLLM's engine client (collective_rpc)."""
