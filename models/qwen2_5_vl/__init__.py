"""Qwen2.5-VL: window-attention vision tower on Qwen2-VL's machinery, Qwen2 decoder with time-based M-RoPE."""
