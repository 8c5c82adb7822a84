"""The ``ksa-rec`` command.

    ksa-rec fit|validate|test --config configs/X.yaml [--trainer.max_epochs=N ...]   (LightningCLI)
    ksa-rec score --checkpoint CKPT --events FILE --output OUT.parquet [--top-k K]
    ksa-rec stream --checkpoint CKPT --events FILE|- --state STATE_DB|redis://HOST:PORT/DB [--output OUT] [--top-k K]
    ksa-rec serve --checkpoint CKPT --state STATE_DB|redis://HOST:PORT/DB [--port 8000]   (HTTP service)

Each subcommand has --help. A bad option or value exits with status 2, bad input (data, checkpoint,
state) with status 1, each with one line ``ksa-rec COMMAND: error: ...`` on stderr naming the option or
the file, row and column. ``--debug`` (any command) shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys

from ksa_rec.training import LIGHTNING_COMMANDS

DEBUG_FLAG = "--debug"
LIGHTNING_LOGGERS = ("lightning_fabric", "pytorch_lightning")


def main(argv: list[str] | None = None) -> int:
    from ksa_rec.errors import ConfigError, KsaRecError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    command, rest = argv[0], argv[1:]
    had_process_group = _process_group_open()
    try:
        if command in LIGHTNING_COMMANDS:
            from ksa_rec.training.cli import run_lightning

            _lightning_notes_to_stdout()
            run_lightning(argv)
        elif command in ("score", "stream", "serve"):
            from ksa_rec.serving import cli

            getattr(cli, command)(rest)
        else:
            print_error(f"ksa-rec: unknown command {command!r}; see ksa-rec --help")
            return 2
    except KsaRecError as err:
        if not had_process_group:
            _close_process_group(clean=False)
        if debug:
            raise
        print_error(f"ksa-rec {command}: error: {err}")
        return 2 if isinstance(err, ConfigError) else 1
    if not had_process_group:
        _close_process_group(clean=True)
    return 0


def _process_group_open() -> bool:
    if "torch" not in sys.modules:  # nothing can have opened one; --help stays free of the torch import
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _close_process_group(clean: bool) -> None:
    """Close the process group that a run on several processes opened (torchrun, ``--trainer.devices N``,
    ``score --devices N``) while the interpreter is whole. Left to interpreter shutdown, gloo's threads
    can abort a process (SIGABRT) or leave its peer waiting for good: seen in the two-node dry run
    (pipelines/multinode_dry_run.py), reported as pytorch/pytorch#190489. After a run that went through,
    every process first waits for the others, so none closes while a peer is still in a collective; after
    an error (raised by every process alike, or by one whose peers then fail) there is nothing to wait for."""
    if not _process_group_open():
        return
    import torch.distributed as dist

    if clean:
        dist.barrier()
    dist.destroy_process_group()


def print_error(line: str) -> None:
    """``line`` on stderr, on a line of its own: a progress bar the failed run left open is cleared first
    (``tqdm.write``), so the error never ends up after the bar's text."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


def _lightning_notes_to_stdout() -> None:
    """Lightning's log records (notes at INFO: seed, devices, restored checkpoint) go to stderr; on stdout
    they join the rest of a run's output, and a run that fails on a bad option prints exactly its one
    error line on stderr (Lightning's warnings go through ``warnings``, still on stderr)."""
    for name in LIGHTNING_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler and handler.stream is sys.stderr:
                handler.setStream(sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
