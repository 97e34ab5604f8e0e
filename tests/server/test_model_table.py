"""`smoothsmoe models` on the installed vLLM, and the README's copy of its table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def printed(server_env) -> str:
    run = subprocess.run([sys.executable, "-m", "smoothsmoe_server", "models", "--markdown"], env=server_env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.rstrip("\n")


def test_readme_table_is_what_smoothsmoe_models_prints(printed):
    readme = re.search(r"<!-- smoothsmoe models: start -->\n(.*?)\n<!-- smoothsmoe models: end -->",
                       README.read_text(), re.S).group(1)
    assert readme == printed, "README's table is stale: paste `smoothsmoe models --markdown`"


def test_the_table_knows_the_families_and_the_reasons(printed):
    rows = {}
    for line in printed.splitlines()[2:]:
        if line.startswith("| "):
            arch, family, smoothed, why, tested = (c.strip() for c in line.strip("|").split(" | "))
            rows[arch] = dict(family=family, smoothed=smoothed, why=why, tested=tested)
    assert rows["MixtralForCausalLM"]["smoothed"] == "yes" and rows["MixtralForCausalLM"]["tested"]
    assert rows["OlmoeForCausalLM"]["family"] == "softmax, not renormalized"
    assert rows["Llama4ForCausalLM"]["family"] == "top-k, then sigmoid, not renormalized"
    llama4 = rows["Llama4ForCausalLM"]  # smoothed by this project's experts when the checkpoint is unquantized
    assert llama4["smoothed"] == "config" and "this project's experts" in llama4["why"]
    assert rows["PhiMoEForCausalLM"]["smoothed"] == "no"  # its sparsemixer routing is no family: never guessed
    assert "bias with softmax" in rows["Ernie4_5_MoeForCausalLM"]["why"]
    assert "LlamaForCausalLM" not in rows  # dense models are not listed
    assert len(rows) > 40 and re.search(r"\d+ model classes build MoE layers", printed.splitlines()[-1])
