"""Tasks: synthetic problems and the demo built on them, kept apart from the core.

``arith`` makes the demo's addition problems (``data.kind: synthetic``, the RL stage's default
prompts, the default answer extractor); ``demo`` is ``hkd demo``. The core never imports a
task for its own logic beyond those data sources.
"""
