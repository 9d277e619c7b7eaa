"""Subcommands of the phenolens CLI, one module per area."""
