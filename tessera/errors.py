"""The base class of errors caused by input a user can fix (a bad file, flag, config or bundle).

The `tessera` command prints these as one line, `error: ...`, and exits with status 2; any other exception
is a bug and keeps its traceback. Set TESSERA_DEBUG=1 to see tracebacks for these too.
"""


class TesseraError(ValueError):
    pass
