"""fusionlm: build, train, evaluate and serve multimodal LLMs."""

__version__ = "0.1.0"
