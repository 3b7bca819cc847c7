"""Training and evaluation of the BLIP-2 video captioner."""
