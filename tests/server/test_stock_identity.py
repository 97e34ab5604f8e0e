"""--no-smoothing serves exactly what stock vLLM serves (no plugin), greedy, tokens and logprobs."""

from __future__ import annotations

import openai
from smoothsmoe_server.models.default_model import DEFAULT_MODEL_NAME as MODEL

from tests.server.test_metrics import scrape

PROMPTS = ["The morning was cold and", "Computer programs are", "1, 2, 3, 4,", "def main():\n   "]


def greedy(url: str):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    out = []
    for p in PROMPTS:
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0.0, logprobs=1)
        lp = r.choices[0].logprobs
        out.append((r.choices[0].text, lp.tokens, lp.token_logprobs))
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                                          max_tokens=16, temperature=0.0, logprobs=True)
    out.append((chat.choices[0].message.content, [t.logprob for t in chat.choices[0].logprobs.content]))
    return out


def test_no_smoothing_is_identical_to_stock_vllm(nosmooth_server, stock_server):
    ours, stock = greedy(nosmooth_server.url), greedy(stock_server.url)
    assert ours == stock  # exact: same tokens, same float logprobs


def test_no_smoothing_still_counts_stock_routing(nosmooth_server):
    client = openai.OpenAI(base_url=f"{nosmooth_server.url}/v1", api_key="none", max_retries=0, timeout=120)
    client.completions.create(model=MODEL, prompt="Counting, please", max_tokens=4, temperature=0.0)
    m = scrape(nosmooth_server.url)
    for layer in range(4):
        tokens = m[("smoothsmoe_tokens_routed_total", (("layer", str(layer)),))]
        assert tokens > 0
        assert m[("smoothsmoe_active_experts_total", (("layer", str(layer)),))] == 4 * tokens  # k=4, no extras
        assert m[("smoothsmoe_extra_experts_total", (("layer", str(layer)),))] == 0
    info = [k for k in m if k[0] == "smoothsmoe_config_info"]
    assert info and dict(info[0][1])["smoothing"] == "off"
