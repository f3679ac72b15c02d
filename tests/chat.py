"""Tiny chat tokenizers and models: the character tokenizer plus a real chat template's special tokens.

``chatml`` is Qwen's ChatML (``<|im_start|>role\\n...<|im_end|>\\n``), ``llama3`` the Llama-3
layout (``<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>`` after the BOS); the
``*_marked`` variants wrap the assistant's reply in ``{% generation %}`` markers as HF's
templates for assistant-only training do.
"""

from __future__ import annotations

from pathlib import Path

from hkd.models.loading import build_preset, char_tokenizer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_MARKED = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA3_MARKED = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML, "chatml_marked": CHATML_MARKED, "llama3": LLAMA3, "llama3_marked": LLAMA3_MARKED}
SPECIALS = {"chatml": ["<|im_start|>", "<|im_end|>"],
            "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


def chat_tokenizer(name: str = "chatml"):
    """The character tokenizer with the template's special tokens and the template itself."""
    family = name.removesuffix("_marked")
    tok = char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[family]})
    tok.chat_template = TEMPLATES[name]
    return tok


def chat_models(tokenizer, teacher_layers: int = 4, student_layers: int = 2):
    """A tiny teacher and student whose vocabulary covers the chat tokenizer's special tokens."""
    from hkd.models.taps import enable_taps

    vocab = {"vocab_size": len(tokenizer)}
    teacher = build_preset("tiny-llama", {"num_hidden_layers": teacher_layers, **vocab}, seed=1).eval()
    student = build_preset("tiny-llama", {"num_hidden_layers": student_layers, **vocab}, seed=2)
    enable_taps(teacher)
    enable_taps(student)
    return teacher, student


def write_chat_models(root: Path, name: str = "chatml") -> dict[str, Path]:
    """Teacher and student directories (weights + chat tokenizer) as a real chat checkpoint has them."""
    from tests.conftest import STUDENT, TEACHER

    tok = chat_tokenizer(name)
    dirs = {}
    for role, sizes, seed in (("teacher", TEACHER, 1), ("student", STUDENT, 2)):
        model = build_preset("tiny-llama", {**sizes, "vocab_size": len(tok)}, seed=seed)
        model.save_pretrained(root / role)
        tok.save_pretrained(root / role)
        dirs[role] = root / role
    return dirs


CONVERSATION = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "12+34="},
    {"role": "assistant", "content": "46"},
    {"role": "user", "content": "and 7+8?"},
    {"role": "assistant", "content": "15"},
]
