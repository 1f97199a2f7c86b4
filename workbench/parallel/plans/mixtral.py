"""The Mixtral plan: blocks are `layers.*`; tensor parallel for attention only; experts declared for EP.

Attention is split as in Llama 3 (wq, wk, wv colwise, wo rowwise; norms sequence-parallel). The MoE FFN is
not tensor-parallel: its experts are the unit of expert parallelism (`expert`). Under fsdp2 with
parallel.ep > 1, workbench/parallel/ep.py gives each ep rank E / ep of every layer's experts and dispatches
tokens with all-to-all over the ep group; the router stays data parallel. EP finds the modules by this
pattern and their type (`workbench.models.moe.Experts`), not by family, so DeepSeek-V3's MoE layers at the
same path take it unchanged (its dense layers have no `moe` and are skipped).
The trainer refuses tp > 1 for a plan with experts for now: under sequence parallelism each tp rank's router
would count only its slice of the sequence, and the balance loss would miss the others; the tensor map
above is what attention will use once the MoE side is built.
Shared experts (model.config.n_shared_experts > 0: `layers.*.moe.shared_experts`, a plain SwiGLU every token
runs) are neither tensor-parallel nor expert-parallel: they sit inside the block, so FSDP2 / ZeRO-3 shard and
activation checkpointing wrap them with it, and under ep each rank runs them on its own tokens. The tensor map
lists none of the MoE's linears, so when tp > 1 is built for experts they will need entries here.
"""

import dataclasses

from workbench.parallel.plans.llama3 import PLAN as LLAMA3

# Llama 3's plan (the attention is its class), without the dense FFN's entries, plus the experts
PLAN = dataclasses.replace(
    LLAMA3,
    tensor={path: style for path, style in LLAMA3.tensor.items() if ".feed_forward." not in path},
    expert="layers.*.moe.experts",
)
