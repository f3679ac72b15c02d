"""Commands: one module per ``hkd`` subcommand that is more than a call into training.

``generate``, ``evaluate``, ``probe``, ``report``, ``init_config``, ``init_student`` and ``demo``;
:mod:`hkd.cli` parses arguments and calls them.

May import every layer below it; nothing below imports a command.
"""
