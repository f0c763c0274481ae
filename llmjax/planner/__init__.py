"""Plan for hardware you do not have: `llmjax compile` builds the real train step for a TPU slice
(or GPU node) from topology descriptions and reports XLA's memory and cost analyses with a
roofline estimate. `topology` names and loads targets, `chips` holds per-chip figures,
`analysis` turns a compiled step into figures, `command` is the verb."""
