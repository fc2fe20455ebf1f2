"""Model parallelism: pipeline stages (and, merged from the tensor-parallel branch, the mesh)."""

from torchlane.parallel.pipeline import Pipeline, pipeline  # noqa: F401
