"""Test and demo helpers: a tiny local Llama model and a multi-turn chat workload."""
