"""Tensor parallelism for examples/gpt.py's GPT (torchlane.parallel, Megatron-LM layout).

    parallelize_gpt(model, mesh["tp"], sequence_parallel=False)

Per block: the fused q/k/v projection column-parallel with q, k and v split separately (each
rank runs n_head / tp heads), the attention output projection row-parallel, the MLP column ->
row. The token embedding is vocab-parallel and tied to the column-parallel output head, whose
vocab-sharded logits go to the vocab-parallel cross-entropy (the full logits are never gathered).
With sequence_parallel the residual stream between the blocks is split along the sequence: the
embedding dropout cuts it, the LayerNorms run on the chunks, and the column / row layers
all-gather / reduce-scatter it instead of all-reducing.
"""

import functools

from torchlane.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    ShardAttribute,
    SplitSequence,
    VocabParallel,
    tensor_parallel,
    vocab_parallel_cross_entropy,
)
from torchlane.parallel.mesh import resolve_group


def tp_plan(cfg, sequence_parallel=False):
    e, sp = cfg.n_embd, sequence_parallel
    plan = {
        "tok_emb": VocabParallel(),
        "blocks.*.attn.qkv": ColwiseParallel(parts=(e, e, e), sequence_parallel=sp),
        "blocks.*.attn.proj": RowwiseParallel(sequence_parallel=sp),
        "blocks.*.attn": ShardAttribute("n_head"),
        "blocks.*.mlp.0": ColwiseParallel(sequence_parallel=sp),
        "blocks.*.mlp.2": RowwiseParallel(sequence_parallel=sp),
        "head": ColwiseParallel(sequence_parallel=sp),
    }
    if sp:
        plan["drop"] = SplitSequence(seq_dim=1)
        plan["blocks.*.ln*"] = SequenceParallel()
        plan["ln_f"] = SequenceParallel()
    return plan


def parallelize_gpt(model, tp_mesh_or_group, sequence_parallel=False):
    """Shard `model` (a GPT) across the tp group in place; returns it. With sequence_parallel,
    every sequence length must be divisible by tp."""
    group = resolve_group(tp_mesh_or_group, "parallelize_gpt")
    tp, cfg = group.size(), model.cfg
    sizes = (("n_embd", cfg.n_embd), ("n_head", cfg.n_head), ("vocab_size", cfg.vocab_size))
    for name, value in sizes:
        if value % tp != 0:
            raise ValueError(f"parallelize_gpt: {name} ({value}) must be divisible by tp ({tp})")
    tensor_parallel(model, group, tp_plan(cfg, sequence_parallel))
    model.cross_entropy = functools.partial(_loss, group=group)
    return model


def _loss(logits, targets, group):
    return vocab_parallel_cross_entropy(logits, targets, group)
