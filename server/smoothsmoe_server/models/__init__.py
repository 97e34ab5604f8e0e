"""Checkpoints built locally (no download): the embedded default model, its drift copy for the
eps-online load test, and the text they are calibrated and evaluated on."""
