"""Decoding: causal sampling with a KV cache and streaming (causal.py), chat conversations (chat.py), and
encoder-decoder decoding with beam search (seq2seq.py)."""

from llmlab.generate.causal import GenerationConfig, TextStream, generate_ids, generate_text

__all__ = ["GenerationConfig", "TextStream", "generate_ids", "generate_text"]
