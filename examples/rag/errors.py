"""The one error the example raises for the user: its message is printed as is, without a traceback."""


class RagError(Exception):
    """Something the user can fix (a missing folder, a server that is down, an index built for another model)."""
