"""User-facing errors: one clear line naming the value, the limit and the fix.

The CLI prints ``str(error)`` and exits 1 for any MegaedgeError; everything else is a bug and keeps its traceback.
"""


class MegaedgeError(Exception):
    """An error the user can fix (bad path, bad file, bad option)."""


class CheckpointError(MegaedgeError):
    """A checkpoint directory, adapter or router file that cannot be used."""


class AudioError(MegaedgeError):
    """Audio that cannot be read or is not valid (NaN/Inf, truncated, unknown format)."""


class AudioTooLongError(AudioError):
    """Audio longer than the caller allows (a server's --max-audio-seconds), found while reading it."""


class NonFiniteAudioError(AudioError):
    """Audio containing NaN or Inf samples: always rejected, never silently skipped."""


class BundleError(MegaedgeError):
    """A bundle directory or manifest that cannot be used."""


class ContextLengthError(MegaedgeError):
    """A request whose prompt, audio and text would overflow the decoder's fixed KV buffer (``--target cuda``)."""


class Cancelled(Exception):
    """A call stopped because the caller set its ``cancel`` event: not a user error, and no result."""


class MissingExtraError(MegaedgeError):
    """An optional dependency group is not installed."""

    def __init__(self, extra: str, module: str):
        super().__init__(
            f"this command needs the '{extra}' extra (module '{module}' is not installed): "
            f"pip install 'megaedge[{extra}]'"
        )
        self.extra = extra
        self.module = module


def require(module: str, extra: str):
    """Import ``module`` or raise MissingExtraError naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised through the CLI tests
        raise MissingExtraError(extra, module) from exc
