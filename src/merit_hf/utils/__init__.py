"""Helpers every layer may use: YAML/flag argument parsing (`arguments`) and the throughput meter (`throughput`).
They import nothing else of merit_hf."""
