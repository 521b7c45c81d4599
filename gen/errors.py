"""The one exception type for user mistakes: the CLI prints its message and exits 1."""


class LlmgenError(Exception):
    pass
