"""Checkpoints: the orbax manager of train state + data iterator (`manager`), checksums (`integrity`),
checkpoint-vs-config checks (`compat`), the data iterator state (`data_state`), starting from another run
(`init_from`).
"""
