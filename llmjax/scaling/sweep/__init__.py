"""Sweeps: specs (`spec`) and hyperparameter axes (`axes`), `llmjax sweep run` (`runner`), `--pack K` grouping
(`pack`) and the multi-point trainer that runs a pack in one program (`multipoint`, `multipoint_loop`),
`llmjax sweep collect` (`collect`).
"""
