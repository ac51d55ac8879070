"""The only code that touches TransformerLens internals.

`facts` (Fact, subject spans), `tokenize` (start tokens, target spaces, padding), `hooks` (hook
factories: capture, noise, restore, freeze, scale; which hook points a model has; the MLP-module
hook ROME needs), `engine` (batched interventions: record once, join rows at their layer; the
key/value cache for decoding), `weights` (MLP layout, weight access, norms, token embeddings),
`mlp_layout`, `readout` (final norm + unembedding of chosen positions). Analyses build on these
and never on TransformerLens's internals directly.
"""
