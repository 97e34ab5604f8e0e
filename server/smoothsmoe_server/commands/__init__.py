"""The command line (`smoothsmoe serve | calibrate | eval | models | ...`): parses flags, sets up
the engine's environment, then hands over to vLLM's server or an offline engine."""
