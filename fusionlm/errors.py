"""User-facing errors: each carries one line that names the file, sample or key at fault.

The CLI prints ``str(error)`` without a traceback and exits non-zero; anything that is not a
``FusionError`` is a bug and keeps its traceback.
"""


class FusionError(Exception):
    """Base class for problems caused by the user's input, not by fusionlm."""


class ConfigError(FusionError):
    """A config or recipe key is unknown, missing, or has a wrong type or value."""


class ImageError(FusionError):
    """An image file is missing, empty, truncated, not an image, or too large."""


class SampleError(FusionError):
    """A sample is malformed (e.g. ``<image>`` count differs from its images)."""


class CheckpointError(FusionError):
    """A checkpoint is missing, incomplete, or holds unexpected keys or shapes."""


class ExportError(FusionError):
    """A model's structure does not fit the checkpoint format it is being exported to."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s message (its type's name when it has none), for a one-line error."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
