"""Training: the one loop (train/loop.py) and one file per objective (lm, mlm, classify, seq2seq, chat).

The names most callers need are importable from here: `from llmlab.train import resolve_config, train`."""

from llmlab.train.config import DEFAULT_PRESET, PRESETS, RunConfig, TrainConfig, resolve_config, valid_keys
from llmlab.train.loop import TrainingInterrupted, TrainResult, load_run_for_resume, train
from llmlab.train.objective import LoopHooks, Objective

__all__ = ["DEFAULT_PRESET", "PRESETS", "LoopHooks", "Objective", "RunConfig", "TrainConfig", "TrainResult",
           "TrainingInterrupted", "load_run_for_resume", "resolve_config", "train", "valid_keys"]
