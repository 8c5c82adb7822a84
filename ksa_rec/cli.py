"""The ``ksa-rec`` command.

    ksa-rec fit|validate|test --config configs/X.yaml [--trainer.max_epochs=N ...]   (LightningCLI)
    ksa-rec score --checkpoint CKPT --events FILE --output OUT.parquet [--top-k K]
    ksa-rec stream --checkpoint CKPT --events FILE|- --state STATE_DB [--output OUT] [--top-k K]

Each subcommand has --help. Bad input exits with status 1 and one line naming the file, row and column.
"""

from __future__ import annotations

import sys

LIGHTNING_COMMANDS = ("fit", "validate", "test")


def main(argv: list[str] | None = None) -> int:
    from ksa_rec.errors import KsaRecError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command in LIGHTNING_COMMANDS:
            from ksa_rec.training.cli import run_lightning

            run_lightning(argv)
        elif command in ("score", "stream"):
            from ksa_rec.serving import cli

            getattr(cli, command)(rest)
        else:
            print(f"ksa-rec: unknown command {command!r}; see ksa-rec --help", file=sys.stderr)
            return 2
    except KsaRecError as err:
        print(f"ksa-rec {command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
