"""Entry point: ``python -m launcher``."""

import atexit
import os
import sys

_code: list[int] = []  # the exit code, once main() has returned


def _exit_now() -> None:
    """The last exit handler (registered before any other): after a command that returned, the process
    ends here, without the interpreter's teardown of torch's and Ray's native state, which took 2 s of
    every run on 2 cores and has nothing left to save (the run closed, Ray stopped, stdio flushed, every
    other exit handler run: log handlers, MLflow's). After an uncaught exception the teardown runs as usual.
    """
    if _code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_code[0])


atexit.register(_exit_now)

from launcher.cli import main  # noqa: E402 - after the handler: every exit handler it brings runs before it

_code.append(main())
sys.exit(_code[0])
