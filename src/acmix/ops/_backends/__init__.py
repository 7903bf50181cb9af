"""Fast local-attention backends; each module registers itself with :mod:`acmix.ops._dispatch`."""
