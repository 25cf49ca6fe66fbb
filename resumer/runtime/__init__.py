"""Live training state: capture, the public ``plan`` / ``resume``, apply, save, async save and RNG."""
