"""Load and speed tests against OpenAI-compatible servers (python -m loadtests.<name>)."""
