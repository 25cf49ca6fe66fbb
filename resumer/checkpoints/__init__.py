"""A root of native checkpoints: listing and selection, reader leases, retention and watching."""
