"""Load profiles: what requests a load test sends (offline datasets: synthetic, or a file)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """One traffic shape, as `vllm bench serve` arguments."""

    name: str
    endpoint: str  # /v1/chat/completions or /v1/completions
    input_len: int  # prompt tokens (synthetic dataset)
    output_len: int  # generated tokens per request
    range_ratio: float = 0.0  # lengths vary uniformly by +- this fraction
    description: str = ""

    @property
    def backend(self) -> str:
        return "openai-chat" if self.endpoint.endswith("chat/completions") else "openai"


PROFILES = {p.name: p for p in (
    Profile("short-chat", "/v1/chat/completions", 64, 32, description="chat turns: short prompt, short answer"),
    Profile("long-prompt", "/v1/completions", 1024, 16, description="long documents in, a few tokens out (prefill)"),
    Profile("streaming", "/v1/chat/completions", 128, 128, description="long streamed answers (decode)"),
    Profile("mixed", "/v1/completions", 256, 64, range_ratio=0.9, description="lengths spread +-90 %"),
)}
