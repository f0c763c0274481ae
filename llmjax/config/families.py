"""Model families (`model.family`) by name: where each one's code lives.

Jax-free, so that config validation can check a name without importing jax; the family
classes themselves are in `llmjax.models.families` (`build_family` imports them). Adding a
family is its module plus one line here.
"""

from __future__ import annotations

# name -> "module:class"
FAMILY_CLASSES: dict[str, str] = {
    "decoder": "llmjax.models.families.decoder:DecoderFamily",
}
