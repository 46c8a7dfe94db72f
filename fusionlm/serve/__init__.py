"""``fusionlm serve``: an OpenAI-compatible HTTP server for any fusionlm checkpoint.

Layers, from the bottom: ``media`` (image URLs fetched safely), ``engine`` (continuous batching
over one model), ``app`` (the FastAPI routes, errors and metrics), and ``cli``'s ``serve``.
"""
