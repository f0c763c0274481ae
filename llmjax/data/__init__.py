"""Data layer: sources (stdlib / local files / TFDS) -> SentencePiece tokens -> packed, sharded batches."""
