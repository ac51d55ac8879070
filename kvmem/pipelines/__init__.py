"""Jobs built from several analyses, each analysis called as it is called alone:

- `four_views`: one fact, four views (causal tracing, knowledge neurons, memories, a ROME edit
  with its CounterFact metrics), what `kvmem demo` runs; the result is a `FactReport`;
- `diagnose`: the localization diagnostic of one fact;
- `stress`: sequential-edit stress tests;
- `neuron_survey`, `moment_survey`: knowledge neurons over many facts, ROME's key statistics over
  many layers (what `kvmem neurons` / `kvmem stats` log and summarise);
- `rome_settings`: the edit layer, context prefixes and statistics size the pipelines use.
"""
