"""Interoperability with other ecosystems' checkpoint formats (`llmjax.interop.hf`: Hugging Face)."""
