"""The device mesh of hybrid parallelism: (pp, dp, tp), tensor parallel fastest-varying.

Global rank r sits at mesh coordinate (pp, dp, tp) with r = (pp * dp_size + dp) * tp_size + tp:
the ranks of one tensor-parallel group are consecutive (on a GPU node they share the fastest
links, as Megatron-LM lays them out), the data-parallel groups stride over them, and pipeline
stages are the outermost blocks.
"""

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from torchlane._validate import check_int

MESH_DIM_NAMES = ("pp", "dp", "tp")


def _positive_int(name, value):
    return check_int(name, value, 1, where="init_mesh")


def init_mesh(dp=None, tp=1, pp=1, device_type=None):
    """A torch DeviceMesh of shape (pp, dp, tp) named ("pp", "dp", "tp") over the default group.

    dp defaults to world_size // (tp * pp). `mesh["tp"]`, `mesh["dp"]`, `mesh["pp"]` are this
    rank's 1-D sub-meshes; `.get_group()` gives their ProcessGroup. device_type defaults to
    "cuda" under NCCL and "cpu" otherwise.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "init_mesh: torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first"
        )
    world = dist.get_world_size()
    tp = _positive_int("tp", tp)
    pp = _positive_int("pp", pp)
    if dp is None:
        if world % (tp * pp) != 0:
            raise ValueError(
                f"init_mesh: the world size {world} is not divisible by tp ({tp}) x pp ({pp}); "
                "choose tp and pp whose product divides the number of ranks"
            )
        dp = world // (tp * pp)
    dp = _positive_int("dp", dp)
    if dp * tp * pp != world:
        raise ValueError(
            f"init_mesh: dp ({dp}) x tp ({tp}) x pp ({pp}) = {dp * tp * pp} does not match the "
            f"world size {world}"
        )
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (pp, dp, tp), mesh_dim_names=MESH_DIM_NAMES)


def resolve_group(mesh_or_group, where):
    """The ProcessGroup of a 1-D DeviceMesh, or the ProcessGroup itself."""
    if isinstance(mesh_or_group, DeviceMesh):
        if mesh_or_group.ndim != 1:
            raise ValueError(
                f"{where}: expected a 1-D mesh (e.g. mesh['tp']), got a mesh of shape "
                f"{tuple(mesh_or_group.shape)}"
            )
        return mesh_or_group.get_group()
    if isinstance(mesh_or_group, dist.ProcessGroup):
        return mesh_or_group
    raise TypeError(
        f"{where}: expected a 1-D DeviceMesh or a torch.distributed.ProcessGroup, got "
        f"{type(mesh_or_group).__name__}"
    )
