"""Runs inside vLLM's engine processes (engine core and workers): patched into every MoE layer,
on the hot path of each forward step, under CUDA graphs on a GPU. Loaded by the
`vllm.general_plugins` entry point (plugin.register)."""
