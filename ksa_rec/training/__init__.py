"""Training: the LightningModule, its metrics, the LightningCLI commands and sharded training."""

LIGHTNING_COMMANDS = ("fit", "validate", "test")
"""The ksa-rec subcommands LightningCLI runs (importing this package imports no Lightning)."""
