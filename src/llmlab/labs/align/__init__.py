"""How LLMs are tuned, and how optimising a proxy goes wrong (issue 20): reward models, best-of-n, DPO and
REINFORCE with a KL penalty, with a programmatic gold reward in view.

    task.py     the lab's task (answer about a document, briefly), its gold reward, demonstrations and the
                proxy's training pairs (label noise, a planted "!")
    fit.py      Gao et al. (2022)'s forms and their fits, best-of-n's exact and analytic KL, the fall statistic
    tune.py     the Python calls: train_sft, train_reward_model, train_dpo, train_reinforce (all through the
                one training loop), best_of_n (batched sampling and scoring)
    lab.py      LabConfig, LabResult, run(config, model, progress, out): the Goodhart lab
    report.py   the lab's report with the shared writer

The losses and objectives live in llmlab.train (preference.py, sft.py, reward.py, dpo.py, reinforce.py).
From the shell: `llmlab align goodhart --quick`, `llmlab align rm|dpo|sft|bon ...`."""

from llmlab.labs.align.lab import LabConfig, LabResult, run
from llmlab.labs.align.task import TaskConfig, gold_reward

__all__ = ["LabConfig", "LabResult", "TaskConfig", "gold_reward", "run"]
