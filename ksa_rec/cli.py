"""The ``ksa-rec`` command.

    ksa-rec fit|validate|test --config configs/X.yaml [--trainer.max_epochs=N ...]   (LightningCLI)
"""

from __future__ import annotations

import sys

LIGHTNING_COMMANDS = ("fit", "validate", "test")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    command = argv[0]
    if command in LIGHTNING_COMMANDS:
        from ksa_rec.training.cli import run_lightning

        run_lightning(argv)
        return 0
    print(f"ksa-rec: unknown command {command!r}; see ksa-rec --help", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
