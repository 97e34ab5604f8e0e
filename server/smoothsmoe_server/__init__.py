"""SmoothSMoE Serve: the vLLM integration and the OpenAI-compatible HTTP server.

The only package of the project that imports vLLM.
"""
