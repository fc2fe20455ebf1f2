"""Training that communicates less often or does not wait: DiLoCo / local SGD (diloco) and an
asynchronous parameter server with bounded staleness (ps, also ``torchlane.ps``)."""

from torchlane.async_ import ps
from torchlane.async_.diloco import DiLoCo, LocalSGD

__all__ = ["DiLoCo", "LocalSGD", "ps"]
