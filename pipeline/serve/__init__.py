"""An OpenAI-compatible HTTP server over the native captioning models, with a chat page (``python -m pipeline.serve``)."""
