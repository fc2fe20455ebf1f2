"""Opt-in glue for training libraries (accelerate, Lightning). Each submodule imports its library
lazily, so `import torchlane` works without them."""
