"""Scaling-law fits: the runs CSV and fit options (`runs`), `llmjax fit` (`fit`), Hoffmann et al. approaches 1-3
(`envelope`, `chinchilla`), Kaplan-style laws (`kaplan`), best-over-hyperparameters laws (`hparams`), the
exponents' intervals from the replicate spread (`replicates`) and the least-squares machinery (`lse`).
"""
