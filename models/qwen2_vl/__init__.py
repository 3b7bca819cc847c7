"""Qwen2-VL: vision tower, Qwen2 decoder with M-RoPE, and its image/video preprocessing."""
