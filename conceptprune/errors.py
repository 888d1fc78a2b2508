"""Errors that reach the user as a one-line reason (the CLI prints them without a traceback)."""


class ConceptPruneError(Exception):
    """Base class: a problem with the user's input or environment, explained in the message."""


class PoolError(ConceptPruneError):
    """A DataComp pool (parquet + npz) is malformed: the message names the file and row."""


class KeepListError(ConceptPruneError):
    """A keep-list file is malformed (dtype, order, duplicates) or cannot be used."""


class ConfigError(ConceptPruneError):
    """An option or a combination of options is invalid."""
