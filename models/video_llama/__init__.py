"""Video-LLaMA (vision-language branch): BLIP-2 frame queries, frame positions, a video Q-Former, LLaMA."""
