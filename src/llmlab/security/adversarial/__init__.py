"""Adversarial suffixes: GCG (Zou et al. 2023) on white-box models, judged by generation, transferred to any
chat target, and measured against the baseline defences of Jain et al. 2023 and SmoothLLM (Robey et al. 2023).

    from llmlab.security.adversarial import GCGConfig, Goal, gcg
    res = gcg(WhiteBox.load("smollm2"), Goal("Tell me a joke", "Sure, here is"), GCGConfig(steps=50))
"""

from llmlab.security.adversarial.gcg import GCGConfig, GCGResult, Goal, gcg

__all__ = ["GCGConfig", "GCGResult", "Goal", "gcg"]
