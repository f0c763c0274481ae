"""Downstream evaluation: log-likelihood scoring (`loglik`), string-level scoring and generation
(`text`), multiple-choice JSONL tasks for in-loop evaluation (`tasks`) and the lm-eval adapter
behind `llmjax harness` (`harness`)."""
