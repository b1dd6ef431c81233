"""Evaluation: perplexity under the papers' protocol and KL divergence against a reference.

    ppl.py        windows, PPL, KL from logits or from the reference's cached statistics
    reference.py  the KL reference and its cache
    run.py        `llmquant eval` as a library command (run_eval)
    tasks.py      zero-shot task accuracy through lm-evaluation-harness (optional extra `tasks`)
"""

from llmquant.evaluate.ppl import (
    DivergenceResult,
    PerplexityResult,
    kl_divergence,
    kl_from_log_probs,
    perplexity,
    window_count,
)
from llmquant.evaluate.reference import Reference, WindowStatistics, head_fingerprint, reference_key, window_statistics
from llmquant.evaluate.run import EvalSettings, run_eval
from llmquant.evaluate.tasks import DEFAULT_TASKS, TaskSettings, evaluate_tasks, mean_accuracy

__all__ = [
    "DEFAULT_TASKS",
    "TaskSettings",
    "evaluate_tasks",
    "mean_accuracy",
    "DivergenceResult",
    "EvalSettings",
    "PerplexityResult",
    "Reference",
    "WindowStatistics",
    "head_fingerprint",
    "kl_divergence",
    "kl_from_log_probs",
    "perplexity",
    "reference_key",
    "run_eval",
    "window_count",
    "window_statistics",
]
