"""The Llama 3 plan: blocks are `layers.*`; Megatron-style tensor parallel inside each block.

Attention: wq, wk, wv split by output (colwise: each rank holds whole heads), wo split by input (rowwise:
one all-reduce, or a reduce-scatter under sequence parallel). Feed-forward: w1, w3 colwise, w2 rowwise.
The norms run sequence-parallel (each rank normalizes its slice of the sequence).
"""

from workbench.parallel.plans import Plan

PLAN = Plan(
    blocks="layers",
    tensor={
        "layers.*.attention.wq": "colwise",
        "layers.*.attention.wk": "colwise",
        "layers.*.attention.wv": "colwise",
        "layers.*.attention.wo": "rowwise",
        "layers.*.feed_forward.w1": "colwise",
        "layers.*.feed_forward.w3": "colwise",
        "layers.*.feed_forward.w2": "rowwise",
        "layers.*.attention_norm": "sequence",
        "layers.*.ffn_norm": "sequence",
    },
    context="layers.*.attention.core",
    head="output",
    embedding="tok_embeddings",
)
