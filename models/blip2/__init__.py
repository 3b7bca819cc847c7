"""BLIP-2 / VideoBLIP video captioner: vision encoder, Q-Former, the composed model and its preprocessing."""
