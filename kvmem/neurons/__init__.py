"""Knowledge neurons (Dai et al., ACL 2022): integrated gradients on MLP neurons, refinement over
paraphrases, and suppress / amplify interventions with a random-neuron control.

- `objective`    the quantity attributed: p(gold target | prompt), teacher-forced (`teacher_forced`)
- `quadrature`   Riemann rules for the path integral, with their error bounds (`riemann_nodes`)
- `attribution`  `integrated_gradients`: every layer and node of a prompt in a few batched passes
- `refinement`   `knowledge_neurons`: attribute a fact's paraphrases, keep the neurons they share
- `effects`      `neuron_effect`: scale chosen neurons (x0, x2) against random ones
- `results`      `NeuronAttribution`, `KnowledgeNeurons`, `NeuronEffect` (to_frame / plot / show)

    kn = kvmem.knowledge_neurons(model, paraphrase_facts)
    kvmem.neuron_effect(model, paraphrase_facts, neurons=kn, factor=0.0)
"""

from kvmem.neurons.attribution import SITES, integrated_gradients
from kvmem.neurons.effects import neuron_effect, random_neurons, scaling_hooks
from kvmem.neurons.objective import TeacherForced, teacher_forced
from kvmem.neurons.quadrature import GEOMETRIC_MIN, RULES, resolve_rule, riemann_nodes
from kvmem.neurons.refinement import knowledge_neurons, refine
from kvmem.neurons.results import KnowledgeNeurons, Neuron, NeuronAttribution, NeuronEffect

__all__ = [
    "GEOMETRIC_MIN",
    "KnowledgeNeurons",
    "Neuron",
    "NeuronAttribution",
    "NeuronEffect",
    "RULES",
    "SITES",
    "TeacherForced",
    "integrated_gradients",
    "knowledge_neurons",
    "neuron_effect",
    "random_neurons",
    "refine",
    "resolve_rule",
    "riemann_nodes",
    "scaling_hooks",
    "teacher_forced",
]
