"""Data: from records to batches of token ids.

``encoding`` (JSONL and synthetic records, prompt templates, label masks, batches), ``hf``
(Hugging Face datasets, streaming), ``packing`` (several rows in one sequence),
``text`` (tokenizer helpers shared by the encoders) and ``tokenalign`` (aligning two tokenizers'
tokens for cross-tokenizer distillation).

May import: :mod:`hkd.models`, :mod:`hkd.config`, :mod:`hkd.tasks`, :mod:`hkd.errors`.
"""

from hkd._moved import forward_names

__getattr__ = forward_names(__name__)  # 0.1 imported these names from the module hkd.data
