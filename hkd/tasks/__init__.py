"""Tasks: synthetic problems, kept apart from the core.

``arith`` makes the demo's addition problems (``data.kind: synthetic``, the RL stage's default
prompts, the default answer extractor); ``chain`` the hard task's column-by-column family.
``hkd demo`` itself lives in :mod:`hkd.commands.demo`.

May import nothing of hkd (a bottom layer: data, sampling and plugins read it).
"""
