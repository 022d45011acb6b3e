"""The poisoning lab: plant a backdoor in a corpus (text, chat, classification), measure it against an
unpoisoned control, watch it survive clean fine-tuning, and find it (spectral signatures, activation
clustering, ONION, a linear probe, dedup), every detector scored against the recorded poison indices."""

from llmlab.security.poisoning.data import PoisonError, PoisonRecord, PoisonSpec, load_record, poison_corpus

__all__ = ["PoisonError", "PoisonRecord", "PoisonSpec", "load_record", "poison_corpus"]
