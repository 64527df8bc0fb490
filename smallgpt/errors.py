"""
The two kinds of user mistake, and how every script reports them: one line on stderr and exit status 1, never
a traceback. ConfigError: a bad config file or --key=value. DataError: missing or damaged data and checkpoints,
or a diverged run. Standard library only: prepare.py imports this without paying for torch.
"""
import errno
import os
import sys


class ConfigError(ValueError):
    """A mistake in a config file or a command-line override: reported as one line, no traceback."""


class DataError(Exception):
    """A problem with user-supplied data or files (or a diverged run): printed as one line, no traceback."""


def run_main(main):
    """Run a script's main(argv), turning the user's mistakes into one line on stderr and exit status 1."""
    name = os.path.basename(sys.argv[0])
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"{name}: config error: {e}")
    except DataError as e:
        sys.exit(f"{name}: error: {e}")
    except KeyboardInterrupt:
        sys.exit(f"\n{name}: interrupted")
    except BrokenPipeError:  # e.g. `python sample.py | head`: the reader left; exit quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        sys.exit(1)
    except OSError as e:  # an unwritable out_dir, a full disk, no network: the message names the path or host
        sys.exit(f"{name}: error: {e}")


def out_of_space(e):
    """Whether an exception means a full disk: an OSError with errno ENOSPC, or a library's own error quoting the
    OS message (safetensors raises SafetensorError '... No space left on device (os error 28)'), or raised while
    handling one (torch.save's zip writer raises a bare RuntimeError whose context is the file's OSError)."""
    while e is not None:
        if getattr(e, "errno", None) == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False
