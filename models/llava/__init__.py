"""LLaVA-1.5, LLaVA-NeXT and PLLaVA: CLIP vision tower + projector + Llama/Mistral decoder."""
from models.llava.modeling import LlavaForConditionalGeneration, PllavaForConditionalGeneration, build_llava
from models.llava.next import LlavaNextForConditionalGeneration

__all__ = ["LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "PllavaForConditionalGeneration",
           "build_llava"]
