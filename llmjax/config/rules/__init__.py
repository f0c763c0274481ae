"""The rules a config must satisfy, checked when it loads (`validate`: cross-field rules and what needs the
device count; `data_rules`: the data section; `mup_rules`: μP's) — config-only, no import above `llmjax.config`."""
