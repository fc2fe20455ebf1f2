"""Training that communicates less often or does not wait: DiLoCo / local SGD (diloco)."""

from torchlane.async_.diloco import DiLoCo, LocalSGD

__all__ = ["DiLoCo", "LocalSGD"]
