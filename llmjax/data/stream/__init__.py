"""The pre-training stream: sources (`sources`), lazy record readers (`records`, `files`), tokenize/cut/pack
stages (`stages`), the grain pipeline of one share (`grain_pipeline`), row -> example objectives
(`row_objectives`), the per-process `DataModule` (`data_module`) and `llmjax bench-data` (`bench_data`).
"""
