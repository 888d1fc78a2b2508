"""Validation of numeric options, in one place.

Every numeric flag of the filters, ``make-pool`` and the keep-list tools is checked here
before any work starts: the CLI uses the argparse types below (a bad value ends the command
with one line naming the flag, exit code 2), and the library functions call the same
``check_*`` functions (raising :class:`ConfigError`), so a Python caller gets the same rules.

Seeds are integers in ``[0, SEED_MAX]``: faiss's k-means takes a C ``int`` seed and the uid
hash a 64-bit one, so a larger seed would silently wrap (2**64 would equal seed 0).
"""

from __future__ import annotations

import math

from .errors import ConfigError

SEED_MAX = 2**31 - 1  # faiss ClusteringParameters.seed is a C int


def _flag(name: str) -> str:
    return name if name.startswith("-") else f"--{name.replace('_', '-')}"


def check_int(name: str, value, *, min: int | None = None, max: int | None = None) -> int:
    """An integer (bools refused) inside [min, max]."""
    if isinstance(value, bool) or not isinstance(value, (int,)) and not _is_integral(value):
        raise ConfigError(f"{_flag(name)} must be an integer, got {value!r}")
    v = int(value)
    if (min is not None and v < min) or (max is not None and v > max):
        raise ConfigError(f"{_flag(name)} must be {_range(min, max)}, got {v}")
    return v


def _is_integral(value) -> bool:
    try:
        import numpy as np

        return isinstance(value, np.integer)
    except ImportError:  # pragma: no cover
        return False


def _range(lo, hi, lo_open=False, hi_open=False) -> str:
    lo, hi = (f"{v:g}" if isinstance(v, float) else v for v in (lo, hi))
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return "a number"


def check_float(name: str, value, *, min: float | None = None, max: float | None = None,
                min_open: bool = False, max_open: bool = False) -> float:
    """A finite number inside the range (NaN and infinities refused)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{_flag(name)} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ConfigError(f"{_flag(name)} must be a finite number, got {value}")
    bad = ((min is not None and (v < min or (min_open and v == min)))
           or (max is not None and (v > max or (max_open and v == max))))
    if bad:
        raise ConfigError(f"{_flag(name)} must be {_range(min, max, min_open, max_open)}, got {v:g}")
    return v


def check_seed(name: str, value) -> int:
    return check_int(name, value, min=0, max=SEED_MAX)


def check_optional(fn, name: str, value, **kw):
    return None if value is None else fn(name, value, **kw)


# -- argparse types: the same rules, applied while the command line is parsed ---------------
#
# They raise ConfigError (not argparse's ArgumentTypeError), which argparse lets through:
# ``conceptprune.cli.main`` prints it as one line naming the flag and exits with code 2,
# before any work.


def _arg_type(check, flag: str, label: str, **kw):
    def parse(text: str):
        try:
            value = float(text) if check is check_float else int(text, 10)
        except ValueError:
            raise ConfigError(f"{flag} must be {'a number' if check is check_float else 'an integer'}, "
                              f"got {text!r}") from None
        return check(flag, value, **kw)

    parse.__name__ = label
    return parse


def int_arg(flag: str, min: int | None = None, max: int | None = None):
    return _arg_type(check_int, flag, "integer", min=min, max=max)


def float_arg(flag: str, min: float | None = None, max: float | None = None, *, min_open: bool = False,
              max_open: bool = False):
    return _arg_type(check_float, flag, "number", min=min, max=max, min_open=min_open, max_open=max_open)


def seed_arg(flag: str = "--seed"):
    return int_arg(flag, 0, SEED_MAX)


def fraction_arg(flag: str = "--fraction"):
    return float_arg(flag, 0.0, 1.0, min_open=True)


def renamed_flag(parser, old: str, new: str, why: str = "") -> None:
    """``old`` is no longer a flag of this command: using it is a one-line error naming ``new``
    (each flag name means one thing across commands)."""
    import argparse

    class Renamed(argparse.Action):
        def __call__(self, p, namespace, values, option_string=None):
            p.error(f"{old} is now {new}" + (f" ({why})" if why else ""))

    parser.add_argument(old, nargs="?", action=Renamed, help=argparse.SUPPRESS)
