"""Data layer: sources -> tokenizer -> grain streams of packed rows -> objective -> per-process batches.

`sources` (which records), `records` (reading them lazily), `tokenizer` (+ `sp_tokenizer`,
`hf_tokenizer`, `run_tokenizer`), `stages` and `pipeline` (the grain stream of one data share),
`objectives` (row -> example), `module` (`DataModule`, `BatchIterator`), `prepare` / `beam`
(offline tokenization into shards), `bench` (`llmjax bench-data`).
"""
