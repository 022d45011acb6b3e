"""The OpenAI-compatible HTTP server. It imports nothing from llmlab.train or llmlab.security."""

from llmlab.serve.app import ServeLimits, ServerThread, create_app, load_for_serving

__all__ = ["ServeLimits", "ServerThread", "create_app", "load_for_serving"]
