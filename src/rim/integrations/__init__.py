"""Bridges from an exported rim model (``rim export``) to tools people already use: lm-evaluation-harness
(``rim.integrations.lmeval``) and llama.cpp (``rim.integrations.llamacpp``).

This package sits at the commands layer: it imports rim's library (prompt building, tasks) and is imported by
nothing in it except the command line, so the library never needs lm-eval or llama.cpp.
"""
