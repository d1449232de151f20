"""Typed errors. Each message names the fix; the CLI prints it on one line and exits with `exit_code`."""

from __future__ import annotations


class PfldError(Exception):
    """Base class: a user-facing failure with a one-line message that says how to fix it."""

    exit_code: int = 1


class UsageError(PfldError):
    """Bad arguments or options (contradictory flags, unknown names)."""

    exit_code = 2


class CheckpointError(PfldError):
    """A checkpoint file that cannot be read (missing, truncated, not a torch file)."""

    exit_code = 3


class PickledModuleError(CheckpointError):
    """The file is a pickled nn.Module from another codebase; only state dicts are accepted."""


class UnsupportedArchitectureError(CheckpointError):
    """The state dict is not a PFLD network."""


class ShapeMismatchError(CheckpointError):
    """The state dict does not fit the model built for it."""


class ModelFileError(CheckpointError):
    """A model file (.onnx, .tflite) that cannot be read, or that is not a landmark model."""


class OutputError(UsageError):
    """An output file could not be written (disk full, read-only or vanished folder).

    Same exit code as the other output-folder refusals: the fix is the same (free space or
    choose another --out).
    """


class DataError(PfldError):
    """Annotation files, image folders or dataset specs that cannot be used."""

    exit_code = 4


class ConversionError(PfldError):
    """A conversion stage (ONNX export, onnx2tf, TFLite) failed."""

    exit_code = 5


class ToleranceError(PfldError):
    """Two backends disagree by more than an explicit tolerance."""

    exit_code = 6

    def __init__(self, what: str, max_diff: float, tolerance: float, detail: str = "") -> None:
        self.what = what
        self.max_diff = float(max_diff)
        self.tolerance = float(tolerance)
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"{what}: max difference {self.max_diff:.3g} exceeds tolerance {self.tolerance:.3g}{extra}"
        )


class BudgetError(PfldError):
    """A size, latency or accuracy budget was not met."""

    exit_code = 7


class DeviceError(PfldError):
    """adb / device problems (none attached, unauthorized, disappeared mid-run)."""

    exit_code = 8
