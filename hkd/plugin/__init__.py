"""The plugin contract: what a stage or any other plugin may rely on.

``hookspecs`` (the hook specifications, THE contract), ``manager`` (the pluggy manager that
registers built-in and entry-point plugins and collects what they return by name), ``stage``
(the ``Stage`` base class, its spec and context) and ``schedule`` (phases, weight ramps and
temperature annealing: when each stage runs).

May import: :mod:`hkd.models` (views and taps a stage sees), :mod:`hkd.sampling`, :mod:`hkd.data`,
:mod:`hkd.config`, :mod:`hkd.kernels`, :mod:`hkd.errors`.
"""
