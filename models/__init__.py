"""Native MindSpore ports of video-language models, their checkpoint loaders and generation."""
