"""The only code that touches TransformerLens internals.

`facts` (Fact, subject spans), `tokenize` (start tokens, target spaces, padding), `hooks` (hook
factories: capture, noise, restore, freeze, scale; which hook points a model has; the MLP-module
hook ROME needs), `engine` (batched interventions: record once, join rows at their layer; the
incremental decoding), `weights` (MLP layout, weight access, norms, token embeddings),
`mlp_layout`, `readout` (final norm + unembedding of chosen positions), `backend` (which
TransformerLens a model comes from; running to a layer, continuing from one, decoding) and
`bridge` (the engine's operations on a TransformerLens 4 TransformerBridge). Analyses build on
these and never on TransformerLens's internals directly, nor ask which TransformerLens they run on.
"""
