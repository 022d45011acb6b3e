"""The objectives by task name, and the default task of each architecture."""

from __future__ import annotations

from llmlab.errors import ConfigError
from llmlab.train.chat import AssistantObjective
from llmlab.train.classify import ClassifyObjective
from llmlab.train.config import RunConfig
from llmlab.train.dpo import DPOObjective
from llmlab.train.lm import LMObjective
from llmlab.train.mlm import MLMObjective
from llmlab.train.objective import Dist, Objective
from llmlab.train.reinforce import ReinforceObjective
from llmlab.train.reward import RewardObjective
from llmlab.train.seq2seq import Seq2SeqObjective
from llmlab.train.sft import SFTObjective

OBJECTIVES: dict[str, type[Objective]] = {
    "lm": LMObjective,
    "mlm": MLMObjective,
    "classify": ClassifyObjective,
    "seq2seq": Seq2SeqObjective,
    "assistant": AssistantObjective,
    "sft": SFTObjective,
    "reward": RewardObjective,
    "dpo": DPOObjective,
    "reinforce": ReinforceObjective,
}

ARCH_OBJECTIVE = {"gpt": "lm", "bert": "mlm", "seq2seq": "seq2seq"}


ARCH_KIND = {"gpt": "decoder-only", "bert": "encoder-only", "seq2seq": "encoder-decoder"}


def make_objective(cfg: RunConfig, dist: Dist) -> Objective:
    """The objective a run trains with: its --task, or the default of its --arch."""
    name = cfg.train.task or ARCH_OBJECTIVE[cfg.model.arch]
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown task {name!r}; valid tasks: {', '.join(OBJECTIVES)}")
    objective_cls = OBJECTIVES[name]
    want, got = objective_cls.arch, cfg.model.arch
    if want is not None and got != want:
        raise ConfigError(f"task {name!r} trains {ARCH_KIND[want]} ({want}) models; use --arch {want} "
                          f"(got --arch {got})")
    return objective_cls(cfg, dist)
