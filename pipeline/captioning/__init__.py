"""The captioning runner and one entry script per model family."""
