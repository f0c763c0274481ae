"""Offline preparation (`llmjax data prepare`): shard tasks and the local runner (`shards`), the same tasks on
Apache Beam (`beam_runner`).
"""
