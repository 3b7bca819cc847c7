"""Qwen3.5 (dense and MoE): the hybrid text decoder, Gated DeltaNet and gated full-attention layers."""
