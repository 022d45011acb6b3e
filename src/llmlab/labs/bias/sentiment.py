"""The lab's sentiment scorer: a small labelled set built from templates (positive and negative
adjectives and verbs in everyday sentences), and a MiniLM classifier fine-tuned on it once and cached
(llmlab.train.classify). Its held-out accuracy is recorded with it and reported beside every score."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llmlab.checkpoint import atomic_write_bytes
from llmlab.progress import Progress, message

POSITIVE = ("wonderful", "great", "excellent", "lovely", "friendly", "kind", "brilliant", "delightful", "helpful",
            "pleasant", "amazing", "cheerful", "generous", "fantastic", "warm", "happy", "calm", "honest",
            "beautiful", "gentle", "successful", "caring", "clever", "fun")
NEGATIVE = ("terrible", "awful", "horrible", "rude", "cruel", "boring", "nasty", "dreadful", "useless",
            "unpleasant", "miserable", "angry", "selfish", "disgusting", "cold", "sad", "lazy", "dishonest",
            "ugly", "violent", "hopeless", "mean", "stupid", "dangerous")
TEMPLATES = ("The {noun} was {adj}.", "It was a {adj} {noun}.", "Everyone said the {noun} was {adj}.",
             "What a {adj} {noun} this is.", "I thought the {noun} was really {adj}.",
             "She found the {noun} {adj}.", "He said the {noun} was {adj} and left.", "They called it {adj}.")
NOUNS = ("day", "meeting", "neighbour", "trip", "teacher", "dinner", "story", "person", "job", "evening")
VERB_SENTENCES = {
    "positive": ("I love this.", "We enjoyed every minute of it.", "She smiled and thanked everyone.",
                 "He was praised for his work.", "They laughed together all night.", "People admire them.",
                 "The crowd cheered.", "It made me so happy."),
    "negative": ("I hate this.", "We regretted every minute of it.", "She shouted and insulted everyone.",
                 "He was blamed for the failure.", "They fought all night.", "People fear them.",
                 "The crowd booed.", "It made me so sad."),
}
VERSION = 1


def labelled_set(seed: int = 0) -> list[tuple[str, str]]:
    """(text, label) pairs, label positive or negative: every template with nouns and adjectives of each
    polarity (a seeded selection, balanced), plus short sentences built on verbs."""
    rng = random.Random(seed)
    rows = []
    for label, adjs in (("positive", POSITIVE), ("negative", NEGATIVE)):
        for t in TEMPLATES:
            for adj in adjs:
                rows.append((t.format(noun=rng.choice(NOUNS), adj=adj), label))
        rows += [(s, label) for s in VERB_SENTENCES[label]]
    rng.shuffle(rows)
    return rows


def _key() -> str:
    doc = json.dumps([VERSION, POSITIVE, NEGATIVE, TEMPLATES, NOUNS, VERB_SENTENCES], sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:12]


def default_classifier_dir() -> Path:
    from llmlab.data import cache_dir

    return cache_dir() / "bias" / f"sentiment-minilm-{_key()}"


def ensure_classifier(progress: Progress | None = None, max_iters: int = 150) -> Path:
    """The run folder of the lab's sentiment classifier in llmlab's cache: fine-tuned from MiniLM on
    labelled_set() the first time (a minute or two on two cores), then reused."""
    import shutil

    from llmlab.train import train
    from llmlab.train.classify import make_finetune_config
    from llmlab.train.loop import run_finished

    run = default_classifier_dir()
    if run_finished(run):
        return run
    shutil.rmtree(run, ignore_errors=True)  # an interrupted fine-tune of the cache is redone
    run.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["text", "label"])
    w.writerows(labelled_set())
    data = run.parent / f"{run.name}-data.csv"
    atomic_write_bytes(data, buf.getvalue().encode())
    message(progress, f"fine-tuning the lab's sentiment classifier from MiniLM into {run} (once)")
    cfg = make_finetune_config("minilm", str(data), {"max_iters": max_iters, "eval_interval": max_iters,
                                                      "batch_size": 16, "lr": 1e-4, "max_len": 32})
    train(cfg, run, callback=progress)
    return run


def classifier_accuracy(run: str | Path) -> float | None:
    """The held-out accuracy the classifier's fine-tune recorded (eval.json), if any."""
    p = Path(run) / "eval.json"
    try:
        return float(json.loads(p.read_text())["accuracy"])
    except (OSError, KeyError, ValueError):
        return None


class SentimentScorer:
    """P(positive) of texts under a fine-tuned classifier (labels include "positive")."""

    def __init__(self, run: str | Path):
        from llmlab.interop import load
        from llmlab.train.classify import classifier_labels

        self.run = Path(run)
        self.model = load(self.run)
        labels = classifier_labels(self.model)
        if "positive" not in labels:
            from llmlab.labs.bias.scoring import BiasError

            raise BiasError(f"classifier {run} has labels {labels}; the sentiment scorer needs a 'positive' label")
        self.positive = labels.index("positive")
        self.accuracy = classifier_accuracy(self.run)

    @torch.no_grad()
    def __call__(self, texts: Sequence[str], batch_size: int = 64) -> list[float]:
        from llmlab.train.classify import classify

        out: list[float] = []
        for i in range(0, len(texts), batch_size):
            chunk = [t if t.strip() else "." for t in texts[i:i + batch_size]]
            out += [r["probabilities"]["positive"] for r in classify(self.model, chunk, max_len=64)]
        return out

    def info(self) -> dict[str, Any]:
        return {"classifier": str(self.run), "held_out_accuracy": self.accuracy}
