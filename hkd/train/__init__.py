"""Training: the loop and everything that keeps a run exact.

``loop`` (``build_run`` / ``train_step`` / ``finish``), ``step`` (the pieces one step and the held-out
evaluation share), ``validation`` (held-out evaluation, best checkpoint), ``checkpoint``,
``distributed`` (DDP/FSDP2), ``rundir`` (the run directory and its config) and ``seeding``.

May import every layer below it: :mod:`hkd.teachers`, :mod:`hkd.plugin`, :mod:`hkd.sampling`,
:mod:`hkd.data`, :mod:`hkd.models`, :mod:`hkd.config`, :mod:`hkd.kernels`, :mod:`hkd.errors`.
Never a built-in plugin by module: those are registered by name.
"""
