"""Subcommands of the ciae CLI, one module each."""
