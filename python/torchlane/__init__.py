from torchlane import _C
