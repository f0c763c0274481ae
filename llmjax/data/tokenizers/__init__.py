"""Tokenizers behind one interface (`tokenizer`): SentencePiece (`sp_tokenizer`), Hugging Face `tokenizers`
(`hf_tokenizer`), a run's own copy (`run_tokenizer`), chat templates (`chat_template`) and decoding model
output (`decode`).
"""
