"""User-facing errors: the CLI prints their message on one line, the server maps them to HTTP 4xx."""


class MoepagerError(Exception):
    """A problem the user can fix (bad flag, missing file, too small a budget)."""


class ModelLoadError(MoepagerError):
    pass


class BudgetError(MoepagerError):
    pass
