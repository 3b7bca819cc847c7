"""Video captioning pipeline: datasets, the captioning runner, training and evaluation."""
