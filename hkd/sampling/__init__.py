"""Sampling: who writes completions, and who judges them.

``backends`` (the generation-backend contract and registry), ``hf_sampler`` (the built-in
KV-cache sampler over ``transformers``), ``verify`` (verifiers for rejection sampling and rewards)
and ``augment`` (prompt transforms for data augmentation).

May import: :mod:`hkd.data`, :mod:`hkd.models`, :mod:`hkd.config`, :mod:`hkd.tasks`, :mod:`hkd.errors`.
"""

from hkd._moved import forward_names

__getattr__ = forward_names(__name__)  # 0.1 imported these names from the module hkd.sampling
