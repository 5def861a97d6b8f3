"""One family of errors, and the one table that maps them to command-line exit codes.

Every error the package raises on purpose derives from :class:`PumapError` and from the
built-in class callers already catch (``ValueError`` for bad parameters and input,
``OSError`` for model files, ``RuntimeError`` for failures while running), so
``except ValueError`` keeps working while ``except pumap_dask.PumapError`` catches them all.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # a stage failed while running
EXIT_USAGE = 2  # bad input, parameters, paths or model files (argparse uses 2 as well)
EXIT_CLUSTER = 3  # the Dask cluster could not be started or reached
EXIT_INTERRUPTED = 130  # Ctrl-C


class PumapError(Exception):
    """Base class of every error pumap_dask raises on purpose."""


class ParameterError(PumapError, ValueError):
    """A parameter has a value that cannot be used (the message names it and what is allowed)."""


class ConfigError(ParameterError):
    """A job file or merged configuration is invalid (the message says where and why)."""


class NetworkError(ParameterError):
    """A custom network or factory cannot be used (wrong output shape, unimportable...)."""


class InputError(PumapError, ValueError):
    """Input that cannot be embedded, with a message that says how to fix it."""


class InputTypeError(InputError, TypeError):
    """Input of a type that cannot be converted to numbers."""


class ModelFileError(PumapError, OSError):
    """A saved model directory is missing, incomplete, corrupt or was modified."""


class ClusterError(PumapError, RuntimeError):
    """The cluster could not be started or reached (the message says how to fix it)."""


class RankLostError(PumapError, RuntimeError):
    """A rank's Dask worker left the cluster (killed, out of memory, lost) mid-training."""


class TrainingError(PumapError, RuntimeError):
    """Training failed in a way a rerun with other settings can fix (e.g. a diverged loss)."""


# the CLI's exit code for each class (the most specific base listed wins); anything else is
# EXIT_FAILED
EXIT_CODES: dict[type, int] = {
    ParameterError: EXIT_USAGE,
    InputError: EXIT_USAGE,
    ModelFileError: EXIT_USAGE,
    # NotFittedError: EXIT_USAGE, entered when the class is made (see __getattr__)
    FileNotFoundError: EXIT_USAGE,
    ClusterError: EXIT_CLUSTER,
    RankLostError: EXIT_FAILED,
    TrainingError: EXIT_FAILED,
    KeyboardInterrupt: EXIT_INTERRUPTED,
}


def exit_code(exc: BaseException) -> int:
    """The CLI exit code of ``exc``: :data:`EXIT_CODES` of its nearest listed class."""
    for cls in type(exc).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return EXIT_FAILED


def _not_fitted_error() -> type:
    """:class:`NotFittedError`: scikit-learn's, subclassed (so ``except
    sklearn.exceptions.NotFittedError`` and scikit-learn's estimator checks catch it).

    Made on first use: importing scikit-learn costs 2-3 s, which every Dask worker that
    runs a transform would otherwise pay for a class it never raises.
    """
    from sklearn.exceptions import NotFittedError as sklearn_not_fitted

    cls = type("NotFittedError", (PumapError, sklearn_not_fitted), {
        "__module__": __name__,
        "__doc__": "The model must be fitted (or loaded) before this call (scikit-learn's, "
                   "subclassed)."})
    EXIT_CODES[cls] = EXIT_USAGE
    return cls


def __getattr__(name: str) -> type:
    if name == "NotFittedError":
        globals()[name] = cls = _not_fitted_error()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
