"""Qwen3-VL (dense): learned-position vision tower with DeepStack, Qwen3 decoder with interleaved M-RoPE."""
