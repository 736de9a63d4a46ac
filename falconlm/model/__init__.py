"""The Falcon model: config, modules, positions, attention, checkpoints."""
