"""The one exception type users see: a clear, one-line message naming the file or field at fault."""


class SparkGPTError(Exception):
    """Bad input from the user (a file, a field, an option). The CLI prints it on one line and exits 1."""
