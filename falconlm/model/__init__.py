"""The Falcon model: config, modules, positions, attention (dense and paged), checkpoints and their formats."""
