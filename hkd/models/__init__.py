"""Models: loading, what is read out of them, and how two of them are compared.

``loading`` (tokenizers, models from a directory or a preset, compatibility checks),
``architectures`` (per-family support: output heads, soft-capping), ``taps`` (hidden states,
attentions and q/k/v captured in one forward), ``view`` (``ModelView``/``TapRequest``: what a
stage receives), ``layermap`` (which student layer learns from which teacher layer) and
``export`` (the student saved for ``from_pretrained`` or sentence-transformers).

May import: :mod:`hkd.config`, :mod:`hkd.kernels`, :mod:`hkd.errors`.
"""

from hkd._moved import forward_names

__getattr__ = forward_names(__name__)  # 0.1 imported these names from the module hkd.models
