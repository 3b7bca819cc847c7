"""Native MindSpore ports of video-language models, their checkpoint loaders and generation."""
from __future__ import annotations

import importlib
from pathlib import Path

# model_type (config.json) -> (module, model class, transformers config class)
MODEL_TYPES = {
    "blip-2": ("models.blip2.modeling", "Blip2ForConditionalGeneration", "Blip2Config"),
    # build_llava picks PLLaVA when config.json has PLLaVA's pooling keys (pooling_shape, ...)
    "llava": ("models.llava.modeling", "build_llava", "LlavaConfig"),
    "pllava": ("models.llava.modeling", "PllavaForConditionalGeneration", "LlavaConfig"),
    "llava_next": ("models.llava.next", "LlavaNextForConditionalGeneration", "LlavaNextConfig"),
    "qwen2_vl": ("models.qwen2_vl.modeling", "Qwen2VLForConditionalGeneration", "Qwen2VLConfig"),
    "qwen2_5_vl": ("models.qwen2_5_vl.modeling", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig"),
    "qwen3_vl": ("models.qwen3_vl.modeling", "Qwen3VLForConditionalGeneration", "Qwen3VLConfig"),
    "qwen3_vl_moe": ("models.qwen3_vl.modeling", "Qwen3VLForConditionalGeneration", "Qwen3VLMoeConfig"),
    # Qwen3.5 / Qwen3.6: Qwen3-VL's vision tower (no DeepStack) on the hybrid decoder of models.qwen3_5
    "qwen3_5": ("models.qwen3_5.vision_language", "Qwen3_5ForConditionalGeneration", "Qwen3_5Config"),
    "qwen3_5_moe": ("models.qwen3_5.vision_language", "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeConfig"),
    # text-only decoders (caption enhancement); Mistral is Llama's architecture here (see models.llama)
    "llama": ("models.llama", "LlamaForCausalLM", "LlamaConfig"),
    "mistral": ("models.llama", "LlamaForCausalLM", "MistralConfig"),
    "qwen2": ("models.qwen2", "Qwen2ForCausalLM", "Qwen2Config"),
    "qwen3": ("models.qwen3", "Qwen3ForCausalLM", "Qwen3Config"),
    "qwen3_moe": ("models.qwen3", "Qwen3ForCausalLM", "Qwen3MoeConfig"),
    # hybrid decoders: Gated DeltaNet and gated full-attention layers (models.qwen3_5)
    "qwen3_5_text": ("models.qwen3_5.modeling", "Qwen3_5ForCausalLM", "Qwen3_5TextConfig"),
    "qwen3_5_moe_text": ("models.qwen3_5.modeling", "Qwen3_5ForCausalLM", "Qwen3_5MoeTextConfig"),
    # composed from three sources its config.json names; built by the class's own from_folder
    "video_llama": ("models.video_llama.modeling", "VideoLlamaForConditionalGeneration", None),
}
# config.json "architectures" entries that name a supported family under another class name
ARCHITECTURES = {
    "Blip2ForConditionalGeneration": "blip-2",
    "VideoBlipForConditionalGeneration": "blip-2",
    "PllavaForConditionalGeneration": "pllava",
}


def build_language_model(text_config, supported: dict[str, tuple[str, str]], owner: str):
    """The decoder a vision-language model wraps, by ``text_config.model_type`` -> (module, class)."""
    if text_config.model_type not in supported:
        raise NotImplementedError(f"{owner} with a {text_config.model_type!r} language model is not supported; "
                                  f"supported: {', '.join(sorted(supported))}")
    module, name = supported[text_config.model_type]
    return getattr(importlib.import_module(module), name)(text_config)


def model_family(config: dict) -> str:
    """The registry key for a parsed config.json: its ``model_type``, else its ``architectures``."""
    if config.get("model_type") in MODEL_TYPES:
        return config["model_type"]
    for arch in config.get("architectures") or ():
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    from models.checkpoint import CheckpointError

    raise CheckpointError(
        f"Unsupported model: model_type={config.get('model_type')!r}, "
        f"architectures={config.get('architectures')}; supported model types: {', '.join(sorted(MODEL_TYPES))} "
        f"(architectures: {', '.join(sorted(ARCHITECTURES))})"
    )


def from_pretrained(folder: str | Path, dtype: str = "float32", weights: str | Path | None = None,
                    tp_size: int = 1):
    """Build the native model named by ``folder``/config.json and load its weights.

    ``dtype`` is float32, float16 or bfloat16 (modules the model keeps in float32 stay so).
    ``weights``: a file whose tensors replace the folder's, such as a LAVIS fine-tuning
    ``.pth`` that holds only the trained parameters. ``tp_size`` > 1 (under msrun, process group
    up): this rank's part of the model split over ``tp_size`` consecutive ranks (``models.parallel``),
    reading only its slices of the weights; ``forward`` and ``generate`` still return full logits
    and ids on every rank of the group. The model is returned in inference mode (``set_train(False)``).
    FP8 block-quantised folders (Qwen's "-FP8" releases) load dequantised to ``dtype``; other quantisations
    are refused.
    """
    import transformers

    from models import parallel
    from models.checkpoint import CheckpointError, check_config, load_checkpoint, read_config, weight_files

    raw = read_config(folder)
    check_config(raw, Path(folder) / "config.json")  # e.g. a GPTQ release: refused before anything is built
    module, class_name, config_name = MODEL_TYPES[model_family(raw)]
    with parallel.building(parallel.init_group(tp_size)):
        if config_name is None:
            return getattr(importlib.import_module(module), class_name).from_folder(folder, dtype=dtype,
                                                                                    weights=weights)
        weight_files(folder)  # fail on a folder without weights before building a large model
        try:
            config = getattr(transformers, config_name).from_dict(raw)
            model = getattr(importlib.import_module(module), class_name)(config)
        except (ValueError, NotImplementedError, ZeroDivisionError) as exc:  # e.g. an unknown rope_type
            raise CheckpointError(f"{Path(folder) / 'config.json'}: {exc}") from exc
    load_checkpoint(model, folder, dtype=dtype, overlay=weights)
    model.set_train(False)
    return model
