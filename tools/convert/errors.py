"""The one exception the converter raises for bad input."""


class ConversionError(Exception):
    """A checkpoint cannot be converted: missing or unreadable file, unsupported architecture or dtype,
    config/weight mismatch, or a LoRA adapter that does not fit. The message is one line and names the
    culprit (file, tensor or key). No output file is left behind when this is raised."""
