"""Benchmarks of the LlamaChat module against the engine under it (llama-cpp-python) and llama.cpp's llama-server.

Run it from the repository root with ``.venv/bin/python -m bench``; see docs/benchmarks.md.
"""
