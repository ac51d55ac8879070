"""The only code that touches TransformerLens internals.

`facts` (Fact, subject spans), `tokenize` (start tokens, target spaces, padding), `hooks` (hook
factories: capture, noise, restore, freeze, scale), `engine` (batched interventions: record once,
join rows at their layer), `weights` (MLP layout and weight access), `mlp_layout`, `readout`
(final norm + unembedding of chosen positions). Analyses build on these and never on
TransformerLens's internals directly.
"""
