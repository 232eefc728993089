"""What each of several GPUs holds of a plan under FSDP (`lowrank plan --gpus N`).

FSDP (recipes/accelerate/fsdp-qlora.yaml) shards every parameter over the N processes, the frozen
4-bit base in its stored layout and the LoRA adapters alike, and with them the adapters' gradients and
optimizer state. Activations stay each card's own (each process runs its own micro-batches). To compute,
FSDP2 gathers whole weights for a while: each decoder layer for its forward and backward, with the next
one prefetched, and the root module's own parameters (embeddings, LM head, norms) from the model's
forward to the end of its backward.
"""

from __future__ import annotations

from lowrank.errors import UserError

# The stages that train sharded over several GPUs; lowrank.fsdp and lowrank.train read them here.
FSDP_STAGES = ("sft",)
# Terms FSDP divides by the GPU count. "gradients in flight" is not one: it is one layer's, whole.
SHARDED_TERMS = ("decoder weights", "embeddings, LM head, norms", "adapters", "optimizer state", "gradients",
                 "optimizer temporaries")


def check_gpus(gpus: int, stage: str, quant: str, optim_bits: int) -> None:
    """Refuse a GPU count, or with several GPUs a stage or setting, that FSDP training refuses too."""
    if gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {gpus}")
    if gpus == 1:
        return
    if stage not in FSDP_STAGES:
        raise UserError(f"--gpus {gpus}: only {', '.join(FSDP_STAGES)} shards over GPUs (FSDP); {stage} runs as DDP, "
                        "where every card holds the whole plan of --gpus 1")
    if quant == "int8":
        raise UserError(f"--gpus {gpus}: --quant int8 cannot be sharded by FSDP; plan nf4 or none")
    if optim_bits != 32:
        raise UserError(f"--gpus {gpus}: under FSDP the optimizer is torch's 32-bit AdamW; plan --optim-bits 32")


def per_card(terms: dict[str, int], gpus: int, layers: int, *, computing: bool) -> dict[str, int]:
    """``terms`` (a phase's breakdown) as each of ``gpus`` cards holds it; the same terms with one card.

    The SHARDED_TERMS are divided by ``gpus``. A ``computing`` phase (every phase but the optimizer
    step) also holds "gathered weights (FSDP)": two of the ``layers`` decoder layers whole, and the
    whole root parameters less the shard already counted.
    """
    if gpus == 1:
        return terms
    card = {name: value // gpus if name.startswith(SHARDED_TERMS) and name != "gradients in flight" else value
            for name, value in terms.items()}
    if computing:
        decoder = sum(value for name, value in terms.items() if name.startswith("decoder weights"))
        root = terms.get("embeddings, LM head, norms", 0)
        card["gathered weights (FSDP)"] = 2 * decoder // layers + root - root // gpus
    return card
