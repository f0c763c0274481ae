"""Offline preparation (`llmjax data prepare`): shard tasks and the local runner (`shards`), the same tasks on
Apache Beam (`beam_runner`), and the curation stages run before tokenizing (`curator`: `dedup`, `quality`, `pii`;
the global dedup pass `curate_pass`; the `report`).
"""
