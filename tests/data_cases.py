"""Routines run inside spawned ranks (tests/dist.py) for test_data.py: a tiny token model trained
on variable-length examples split by TokenBalancedSampler, with the global-token loss."""

import torch
import torchlane
from torch import nn
from torchlane import data

VOCAB = 11


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 8)
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(8, VOCAB)

    def forward(self, x):
        return self.out(torch.tanh(self.mix(self.emb(x))))


def example(i, length):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randint(0, VOCAB, (length + 1,), generator=g)


def summed_loss(model, indices, lengths):
    """Sum over every token of every example of the next-token cross entropy, plus 0 * params
    so that a rank with no examples still produces a gradient for every parameter."""
    total = sum(p.sum() * 0.0 for p in model.parameters())
    for i in indices:
        seq = example(i, lengths[i])
        logits = model(seq[:-1])
        total = total + nn.functional.cross_entropy(logits, seq[1:], reduction="sum")
    return total


def reference_grads(indices, lengths):
    """One process, the whole global batch, per-token mean loss."""
    model = TinyLM()
    n = sum(lengths[i] for i in indices)
    (summed_loss(model, indices, lengths) / n).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def ddp_grads(rank, world, lengths, batch_size, shares):
    """Each rank trains on its token-balanced (or share-weighted) part of global step 0."""
    sampler = data.TokenBalancedSampler(lengths, batch_size=batch_size, seed=3, shares=shares)
    mine = next(iter(sampler))
    model = torchlane.DistributedDataParallel(TinyLM())
    n = data.global_token_count(sum(lengths[i] for i in mine))
    data.token_normalized_loss(summed_loss(model, mine, lengths), n, world).backward()
    return {k: p.grad.clone() for k, p in model.module.named_parameters()}, mine, n
