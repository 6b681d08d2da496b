"""The error every exporter stage raises when a model cannot be exported."""


class ExportError(ValueError):
    """A model, layer or graph cannot be exported; the message names the layer and why."""
