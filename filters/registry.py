"""The filter registry: every filter declares itself once, in its own module.

A filter module ends with one declaration::

    SPEC = register(FilterSpec(
        name="my-filter", help="one line for --help", fn=my_filter, runs_as="rows",
        params=(Param("--fraction", fraction_arg(), required=True, help="..."),
                Param("--prefer", keyword="keep", choices=("hard", "easy"), default="hard")),
        explain=my_explain_hook))

and that is all: ``conceptprune filter my-filter`` (its flags, the shared ones, the checks,
``run_filter``), ``report``/``explain`` (how it ran and its explain hook), the scaling sweep
(``sweep=True`` for filters with ``--fraction``) and pipeline files read this table. No list
of filters exists anywhere else.

Which modules are read: every module of this package whose source declares a ``FilterSpec(``
(found by reading the files, so a new module is picked up without being listed), plus the
modules named in ``$CONCEPTPRUNE_FILTER_MODULES`` (comma-separated import names: filters that
live outside the package, e.g. a user's own).

``runs_as`` says how a filter's work is cut, which ``run_filter`` and the report need:

- ``rows``: row-range parts merged into one sorted set (``filters/rows.py``); its parts go
  beside ``--out``;
- ``clustering``: the k-means graph (``filters/clustering.py``); its clustering folder goes
  beside ``--out`` unless ``--clustering`` is given;
- ``list``: one pass in this process over the whole candidate list.

A spec with ``command`` instead of ``fn`` is a tool under ``filter`` (it takes its own flags
and writes no keep-list through ``run_filter``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from conceptprune.errors import ConfigError

RUNS_AS = ("rows", "clustering", "list")
_MARK = "FilterSpec("  # how a module says it declares a filter (read from its source)


@dataclass(frozen=True)
class Param:
    """One typed parameter of a filter: its command-line flag and the keyword of the filter
    function it becomes (``keyword``; default: the flag's name with ``_`` for ``-``)."""

    flag: str
    type: Callable[[str], Any] | None = None
    default: Any = None
    help: str = ""
    choices: Sequence[Any] | None = None
    required: bool = False
    keyword: str | None = None  # the filter function's keyword (default: from the flag)
    group: str | None = None  # params sharing a group name are mutually exclusive
    action: str | None = None  # "store_true" for a switch
    metavar: str | None = None
    nargs: str | int | None = None

    @property
    def dest(self) -> str:
        """argparse's attribute name for the flag."""
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def name(self) -> str:
        """The filter function's keyword."""
        return self.keyword or self.dest

    def add_to(self, parser, in_group: bool = False) -> None:
        """Add the flag (in a mutually exclusive group the group, not the flag, is required)."""
        kw: dict[str, Any] = {"help": self.help}
        if self.flag.startswith("-"):
            kw["dest"] = self.dest
        if self.action:
            kw["action"] = self.action
        else:
            kw.update(default=self.default, type=self.type, choices=self.choices, metavar=self.metavar)
            if self.nargs is not None:
                kw["nargs"] = self.nargs
        if self.required and not in_group:
            kw["required"] = True
        parser.add_argument(self.flag, **{k: v for k, v in kw.items() if v is not None or k == "default"})


@dataclass(frozen=True)
class FilterSpec:
    """Everything the toolkit knows of one filter."""

    name: str
    help: str
    fn: Callable[..., Any] | None = None  # f(pool, *, within, **params) -> FilterResult
    runs_as: str = "list"
    params: tuple[Param, ...] = ()
    embeddings: bool = False  # takes --embedding-key / --embedding-dir / --bad-embeddings
    clustering: bool = False  # takes the clustering flags (one ClusteringConfig as `clustering`)
    jobs: bool = True  # takes the job flags (an Executor as `executor`)
    common: bool = True  # takes --pool / --out / --within / --overwrite / --allow-empty
    renamed: tuple[tuple[str, str, str], ...] = ()  # (old flag, new flag, why) refused with a hint
    prepare: Callable[[argparse.Namespace, dict], dict] | None = None  # last word on all the keywords
    command: Callable[[argparse.Namespace], Any] | None = None  # a tool: runs the namespace itself
    explain: Callable[..., dict] | None = None  # explain hook: (step view, uid array, kept) -> dict
    sweep: bool = False  # usable by the scaling sweep (it passes fraction=)
    default_clusters: str | None = None  # what --clusters' help quotes as the default
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None  # flags beyond Param's reach

    def __post_init__(self):
        if self.runs_as not in RUNS_AS:
            raise ValueError(f"filter {self.name}: runs_as must be one of {RUNS_AS}, not {self.runs_as!r}")
        if (self.fn is None) == (self.command is None):
            raise ValueError(f"filter {self.name}: give exactly one of fn (a filter) or command (a tool)")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"filter {self.name}: two parameters share a keyword")

    # -- the command line -------------------------------------------------------------------

    def add_arguments(self, parser) -> None:
        """This filter's own flags (the shared ones are added by the CLI)."""
        groups: dict[str, Any] = {}
        for p in self.params:
            if p.group is None:
                p.add_to(parser)
                continue
            if p.group not in groups:
                required = any(q.required for q in self.params if q.group == p.group)
                groups[p.group] = parser.add_mutually_exclusive_group(required=required)
            p.add_to(groups[p.group], in_group=True)
        if self.extra_args is not None:
            self.extra_args(parser)

    def keywords(self, a: argparse.Namespace) -> dict:
        """The filter function's keywords from parsed flags."""
        return {p.name: getattr(a, p.dest) for p in self.params}

    def params_from(self, given: dict) -> dict:
        """Keywords from a mapping keyed by flag names or keywords (pipeline files, the sweep),
        the shared ones (clustering, embeddings, executor) included where the filter takes them:
        unknown names are an error naming the filter."""
        by = {p.dest: p.name for p in self.params} | {p.name: p.name for p in self.params}
        shared = (["clustering"] if self.clustering else []) + (["executor"] if self.jobs else []) \
            + (["embedding_key", "embedding_dir", "bad_embeddings"] if self.embeddings else [])
        by |= {k: k for k in shared}
        unknown = [k for k in given if k.replace("-", "_") not in by]
        if unknown:
            raise ConfigError(f"filter {self.name} has no parameter {unknown[0]!r}; "
                              f"it takes {', '.join(sorted(by)) or 'none'}")
        return {by[k.replace("-", "_")]: v for k, v in given.items()}


_REGISTRY: dict[str, FilterSpec] = {}
_LOADED = False


def register(spec: FilterSpec) -> FilterSpec:
    """Add a filter to the table (its module calls this once, at import)."""
    old = _REGISTRY.get(spec.name)
    if old is not None and _origin(old) != _origin(spec):  # (a module imported anew replaces its own)
        raise ValueError(f"two filters are named {spec.name!r}: {_origin(old)} and {_origin(spec)}")
    _REGISTRY[spec.name] = spec
    return spec


def _origin(spec: FilterSpec) -> str:
    f = spec.fn or spec.command
    return f"{f.__module__}.{f.__qualname__}"


def _declaring_modules() -> list[str]:
    here = Path(__file__).parent
    out = []
    for m in pkgutil.iter_modules([str(here)]):
        if m.name == "registry" or m.ispkg:
            continue
        try:
            if _MARK in (here / f"{m.name}.py").read_text(encoding="utf-8"):
                out.append(f"{__package__}.{m.name}")
        except OSError:
            continue
    extra = [s.strip() for s in os.environ.get("CONCEPTPRUNE_FILTER_MODULES", "").split(",") if s.strip()]
    return sorted(out) + extra


def load() -> dict[str, FilterSpec]:
    """Import every declaring module once; the table, in name order."""
    global _LOADED
    if not _LOADED:
        for name in _declaring_modules():
            try:
                importlib.import_module(name)
            except ImportError as e:
                raise ConfigError(f"filter module {name} (CONCEPTPRUNE_FILTER_MODULES?) cannot be imported: {e}") from e
        _LOADED = True
    return dict(sorted(_REGISTRY.items()))


def specs() -> list[FilterSpec]:
    return list(load().values())


def get(name: str) -> FilterSpec:
    table = load()
    if name not in table:
        raise ConfigError(f"unknown filter {name!r}; known: {', '.join(table)}")
    return table[name]


def spec_for(fn: Callable) -> FilterSpec | None:
    """The spec of a filter function (None for a function nobody registered)."""
    for s in load().values():
        if s.fn is fn:
            return s
    return None


def runs_as(fn_or_name) -> str:
    """How a filter runs: 'rows', 'clustering' or 'list' (unregistered functions: 'list')."""
    s = get(fn_or_name) if isinstance(fn_or_name, str) else spec_for(fn_or_name)
    return s.runs_as if s is not None else "list"


def names(*, runs: str | None = None, sweep: bool | None = None) -> list[str]:
    return [s.name for s in specs() if s.fn is not None and (runs is None or s.runs_as == runs)
            and (sweep is None or s.sweep == sweep)]
