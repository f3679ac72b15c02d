"""Teachers: where a step's teacher outputs come from.

``sources`` (the ``TeacherSource`` contract: a live model run with taps, or the offline cache) and
``cache`` (building and reading the cache of teacher targets: full, top-k and sampled).

May import: :mod:`hkd.plugin`, :mod:`hkd.sampling`, :mod:`hkd.data`, :mod:`hkd.models`,
:mod:`hkd.config`, :mod:`hkd.kernels`, :mod:`hkd.errors`.
"""
