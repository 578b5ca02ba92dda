"""The ``nns`` commands, one module each (``nns <name>`` runs ``nns_cuda.app.commands.<name>``).

Every module has ``HELP`` (the one line of ``nns --help``), ``DESCRIPTION`` (and optionally
``EPILOG``) for ``nns <name> --help``, ``add_arguments(parser) -> parser`` and
``run(args, **kw) -> int`` (the exit status: 0, or 2 on bad input with one line on stderr).
On the ``nns`` command line ``args.command`` is the command's name. The command table is
:data:`nns_cuda.app.cli.COMMANDS`.
"""
