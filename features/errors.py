"""The small error hierarchy every module raises. Messages name the value, the rule and the fix."""


class MerError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(MerError):
    """A params.yaml section or argument is wrong; the message names the key and the fix."""


class ModelLoadError(MerError):
    """Model weights are missing or did not load; never silently fall back to random weights."""


class ClipError(MerError):
    """One clip cannot be processed. Stages record it in the failure report and go on.

    `reason` is a short machine-readable tag (``no_audio``, ``unreadable``, ``zero_length``,
    ``no_face``, ``asr_failed`` ...); the message says what happened and what to do.
    """

    def __init__(self, clip_id: str, reason: str, message: str):
        super().__init__(f"clip {clip_id!r}: {message}")
        self.clip_id = clip_id
        self.reason = reason
        self.detail = message
