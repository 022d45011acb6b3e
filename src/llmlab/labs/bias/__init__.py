"""The bias lab: the literature's bias measures on real models, and a dose-response check that each
measure moves with a bias planted in the training corpus.

- assoc: WEAT (Caliskan et al. 2017) and SEAT (May et al. 2019) on an encoder's embeddings
- crows: CrowS-Pairs (Nangia et al. 2020), pseudo-log-likelihood (masked LMs) or log-likelihood (causal LMs)
- bbq: BBQ (Parrish et al. 2022) multiple choice by answer likelihood, lm-eval's bias scores
- counterfactual: attribute swaps, generation, scoring, Wasserstein-1 (Huang et al. 2020)
- dose: train at known co-occurrence skews p and fit every metric against p
- scoring: the batched likelihood scorers they share; report: the reports

Each experiment is a Config dataclass, a Result dataclass and run(config, model, progress)."""

from llmlab.labs.bias.assoc import AssocConfig, AssociationTest, AssocResult, WordSet, read_wordsets
from llmlab.labs.bias.bbq import BBQConfig, BBQResult, bbq_scores, read_bbq
from llmlab.labs.bias.counterfactual import CounterfactualConfig, CounterfactualResult
from llmlab.labs.bias.crows import CrowsConfig, CrowsResult, Pair, read_pairs, score_pairs
from llmlab.labs.bias.dose import DoseConfig, DoseResult, make_corpus
from llmlab.labs.bias.scoring import BiasError

__all__ = ["AssocConfig", "AssocResult", "AssociationTest", "BBQConfig", "BBQResult", "BiasError",
           "CounterfactualConfig", "CounterfactualResult", "CrowsConfig", "CrowsResult", "DoseConfig", "DoseResult",
           "Pair", "WordSet", "bbq_scores", "make_corpus", "read_bbq", "read_pairs", "read_wordsets", "score_pairs"]
