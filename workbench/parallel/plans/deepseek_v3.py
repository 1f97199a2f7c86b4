"""The DeepSeek-V3 plan: blocks are `layers.*`; experts declared for expert parallelism; no tensor map yet.

The routed experts (`layers.*.moe.experts`, the MoE layers after the first n_dense_layers) are the unit of
expert parallelism, as in Mixtral's plan. Tensor parallelism for MLA is not declared: its down-projections
(wq_a, wkv_a) and latent norms stay whole on every rank while wq_b / wkv_b would split by heads, which
needs its own sharding styles; the trainer refuses tp > 1 for every plan with experts anyway (the routers
would count only a tensor-parallel rank's slice of the sequence). The MTP modules (`mtp.*`) sit outside
`blocks`, so FSDP2 keeps them in the root unit with the embedding and head they share.
"""

from workbench.parallel.plans import Plan

PLAN = Plan(
    blocks="layers",
    expert="layers.*.moe.experts",
    context="layers.*.attention.core",
    head="output",
    embedding="tok_embeddings",
)
