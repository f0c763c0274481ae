"""Sweeps: specs (`spec`), hyperparameter axes (`axes`) and seeds as replicates (`replicates`), `llmjax sweep run`
(`runner`), `--pack K` grouping (`pack`) and the multi-point trainer that runs a pack in one program (`multipoint`:
the stacked program; `multipoint_loop`: the adapter that runs K points through the trainer's loop and hooks),
`llmjax sweep collect` (`collect`: also each point's state and a partial sweep's missing points).
"""
