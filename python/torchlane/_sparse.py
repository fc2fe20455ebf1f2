"""Which parameters torchlane DDP reduces as sparse tensors (Note [Sparse gradients], reducer.cpp).

``expected_sparse`` follows torch DDP's rule: a parameter of an ``nn.Embedding`` or
``nn.EmbeddingBag`` built with ``sparse=True`` gets a sparse gradient and a bucket of its own.
``row_sparse_indices`` resolves the opt-in ``row_sparse_params=`` argument (parameters whose
gradient is dense but touches few rows, reduced as (row index, row) pairs).
"""

from __future__ import annotations

import torch
from torch.nn import Module


def expected_sparse(module: Module, params: list[torch.Tensor]) -> list[int]:
    """Indices into ``params`` of the parameters that torch DDP expects a sparse gradient for."""
    owner: dict[int, Module] = {}
    for _, m in module.named_modules():
        for p in m.parameters(recurse=False):
            owner.setdefault(id(p), m)  # the first owner, as torch DDP's deduplication keeps
    sparse = []
    for i, p in enumerate(params):
        m = owner.get(id(p))
        if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse:
            sparse.append(i)
    return sparse


def row_sparse_indices(
    row_sparse_params, names: list[str], params: list[torch.Tensor], sparse: list[int]
) -> list[int]:
    """Resolve ``row_sparse_params`` (parameter names or the parameters themselves) to indices."""
    if row_sparse_params is None:
        return []
    if isinstance(row_sparse_params, (str, torch.Tensor)) or not hasattr(
        row_sparse_params, "__iter__"
    ):
        raise TypeError(
            "row_sparse_params must be a list of parameter names or parameters, got "
            f"{type(row_sparse_params).__name__}"
        )
    by_name = {n: i for i, n in enumerate(names)}
    by_id = {id(p): i for i, p in enumerate(params)}
    out = []
    for item in row_sparse_params:
        if isinstance(item, str):
            if item not in by_name:
                raise ValueError(
                    f"row_sparse_params: {item!r} is not the name of a parameter that DDP reduces "
                    f"(names as in module.named_parameters(), requires_grad, not ignored)"
                )
            i = by_name[item]
        elif isinstance(item, torch.Tensor):
            if id(item) not in by_id:
                raise ValueError(
                    "row_sparse_params: a tensor that is not one of the module's parameters "
                    "that DDP reduces"
                )
            i = by_id[id(item)]
        else:
            raise TypeError(
                "row_sparse_params entries must be parameter names (str) or parameters, got "
                f"{type(item).__name__}"
            )
        if i in sparse:
            raise ValueError(
                f"row_sparse_params: parameter {names[i]!r} already gets a sparse gradient "
                "(nn.Embedding/EmbeddingBag with sparse=True) and is reduced as sparse"
            )
        if params[i].dim() < 1:
            raise ValueError(
                f"row_sparse_params: parameter {names[i]!r} is a scalar; row-sparse reduction "
                "needs at least one dimension of rows"
            )
        if i in out:
            raise ValueError(f"row_sparse_params: parameter {names[i]!r} is listed twice")
        out.append(i)
    return out
