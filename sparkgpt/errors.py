"""The one exception type users see: a clear, one-line message naming the file or field at fault."""


class SparkGPTError(Exception):
    """Bad input from the user (a file, a field, an option). The CLI prints it on one line and exits 1."""


class FieldError(SparkGPTError):
    """Bad input in one field of a request (e.g. a message's content part): `field` names it, as OpenAI's `param`
    does, so a server answers a 400 about that field without reading the message."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
