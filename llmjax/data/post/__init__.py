"""Post-training data: JSONL records (`jsonl`), SFT conversations (`sft_data`), DPO pairs with cached reference
log-probabilities (`preference_data`), and their step-indexed iterator (`step_iterator`).
"""
