"""kvbm behind TensorRT-LLM's KV cache connector interface (PyTorch backend)."""
