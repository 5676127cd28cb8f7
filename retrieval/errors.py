"""The application's exception type for user mistakes."""


class RetrievalError(Exception):
    """A bad request (a file, an option, a mismatched model and index); the message says which."""
