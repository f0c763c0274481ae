"""Post-training: LoRA adapters (`lora`), the DPO objective (`dpo`) and the SFT objective (`sft`); their data
lives in `llmjax.data.post`.
"""
