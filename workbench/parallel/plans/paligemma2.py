"""The PaliGemma 2 plan: both towers' blocks are FSDP units; projector, embeddings and norms stay in the root unit.

Units, in wrapping order: the Gemma 2 decoder's `language_model.layers.*`, then the SigLIP encoder's
`vision_tower.layers.*` (`more_blocks`). The root unit holds what is left: the patch embedding, the vision
position embedding and post-norm, the projector (`multi_modal_projector`, small: one vision-width x text-width
matrix), the token embedding (tied to the head) and the final norm. A forward gathers the vision blocks one at a
time, then the root's projector and embedding, then the decoder blocks, so at most one block of either tower is
unsharded at a time (besides the root). Activation checkpointing and compile treat every unit of both towers.
Frozen parts (objective vlm's `train_parts`) stay in their units: FSDP2 shards them too, and they simply get no
gradient.

No tensor-parallel entries: objectives other than lm run data-parallel only (workbench.job), and a VLM here is
fine-tuned with objective vlm. No context parallel: the prefix-LM mask's bidirectional prefix is not built into
the ring / Ulysses cores.
"""

from workbench.parallel.plans import Plan

PLAN = Plan(
    blocks="language_model.layers",
    more_blocks=("vision_tower.layers",),
    embedding="language_model.embed_tokens",
)
