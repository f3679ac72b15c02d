"""``hkd init-student``: cut a student out of its teacher instead of starting from random weights.

Three ways to shrink, combinable, all for Llama-family decoders (Llama, Qwen2, Mistral: the
``model.layers.N.self_attn/mlp`` layout with RMSNorm):

* **Depth** (``--layers``): keep some transformer blocks. ``every:K`` keeps blocks
  ``K-1, 2K-1, ...`` (0-based; the last block of every group of K, so the final block, which
  the final norm and LM head were trained against, is always kept; DistilBERT keeps one of
  every two layers); ``0,3,7,11`` keeps those blocks; ``importance:N`` keeps the N blocks that
  change the residual stream most on calibration batches (block influence
  ``1 - cos(block input, block output)`` averaged over real tokens, as ShortGPT; the same
  question ``hkd probe`` asks of layers, asked of one model). Embeddings, final norm and LM
  head are copied.
* **Width** (``--hidden``, ``--intermediate``, ``--heads``), the Minitron recipe: rank by
  activation magnitude on calibration batches, keep the top, slice every weight that reads
  or writes the pruned units. Hidden channels: mean ``|x|`` of every RMSNorm's output (the
  inputs of attention, MLP and LM head), summed over the kept blocks. MLP neurons: mean
  ``|act(gate(x)) * up(x)|`` per block. Heads: mean L2 norm of each head's output (the input
  of ``o_proj``) per block; under grouped-query attention whole key/value groups are kept, so
  ``--heads`` must be a multiple of the query heads per key/value head. Pruning channels
  changes RMSNorm's denominator (a mean over fewer channels), so norm gains are multiplied by
  ``sqrt(H / H')`` and ``rms_norm_eps`` by ``H / H'``: the student is then exactly the teacher
  when the pruned channels carry no signal, and close when they carry little. ``head_dim`` is kept.
* **Sharing** (``--share-layers K``, ALBERT): refused for these decoders. Hugging Face's
  Llama-family format has no cross-layer sharing, so a saved model would load with K
  independent copies and the sharing would be gone at the first optimizer step.

The output is an ordinary model directory (safetensors + the teacher's tokenizer) with
``hkd-init.json``: the teacher, every option, the kept blocks, heads and the layer map
``[[student_layer, teacher_layer], ...]`` in ``output_hidden_states`` numbering (0 =
embeddings), which a stage's ``layer_map: {strategy: init}`` reads (``auto`` uses it when
present, see :mod:`hkd.models.layermap`).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, PreTrainedModel

from hkd.config import DataConfig, ModelConfig
from hkd.config.flags import BATCHES, SEED, SIZE, check_number
from hkd.config.outputs import check_output_dir, move_into, temp_dir_beside
from hkd.data.encoding import Batches, encode_dataset
from hkd.errors import HkdError
from hkd.models.loading import freeze, load_model

INIT_RECORD = "hkd-init.json"  # how a student directory was cut from its teacher


@dataclass
class InitOptions:
    """Everything ``hkd init-student`` takes besides the two directories."""

    layers: str | None = None  # every:K | i,j,k (0-based blocks) | importance:N; None keeps every block
    hidden: int | None = None
    intermediate: int | None = None
    heads: int | None = None  # query heads per block
    share_layers: int | None = None
    data: str | None = None  # calibration JSONL (needed for importance:N and width pruning)
    prompt_field: str | None = None  # as DataConfig: None = plain text in text_field
    completion_field: str = "completion"
    text_field: str = "text"
    batches: int = 4
    batch_size: int = 8
    max_length: int = 128
    seed: int = 0


@dataclass
class Importance:
    """Activation statistics of the teacher on calibration batches (means over real tokens)."""

    block: list[float]  # per block: 1 - cos(input, output)
    channels: Tensor  # [H]: mean |RMSNorm output|, summed over norms
    heads: list[Tensor] = field(default_factory=list)  # per block [Hq]: mean L2 norm of each head's output
    neurons: list[Tensor] = field(default_factory=list)  # per block [I]: mean |act(gate) * up|


def _layers_of(model: PreTrainedModel) -> Any:
    """The decoder blocks (``model.model.layers``) of a Llama-family model, or a clear refusal."""
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    block = layers[0] if layers is not None and len(layers) else None
    if block is None or not all(hasattr(block, n) for n in ("self_attn", "mlp", "input_layernorm")):
        raise HkdError(f"init-student supports Llama-family decoders (model.layers[i].self_attn/mlp); "
                       f"{type(model).__name__} is not one")
    return layers


def parse_layers(spec: str | None, num_layers: int) -> tuple[str, int | list[int]]:
    """``("all", L)``, ``("every", K)``, ``("explicit", [blocks])`` or ``("importance", N)``."""
    if spec is None:
        return "all", num_layers
    kind, _, arg = spec.partition(":")
    if kind in ("every", "importance") and arg:
        try:
            n = int(arg)
        except ValueError:
            raise HkdError(f"--layers {spec!r}: expected an integer after '{kind}:'") from None
        if kind == "every" and not 1 <= n <= num_layers:
            raise HkdError(f"--layers {spec!r}: K must be in 1..{num_layers} (the teacher has {num_layers} blocks)")
        if kind == "importance" and not 1 <= n <= num_layers:
            raise HkdError(f"--layers {spec!r}: N must be in 1..{num_layers} (the teacher has {num_layers} blocks)")
        return kind, n
    try:
        blocks = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise HkdError(f"--layers {spec!r}: use every:K, importance:N or comma-separated 0-based blocks") from None
    if not blocks or sorted(set(blocks)) != blocks:
        raise HkdError(f"--layers {spec!r}: blocks must be distinct and increasing")
    if blocks[0] < 0 or blocks[-1] >= num_layers:
        raise HkdError(f"--layers {spec!r}: blocks are 0-based and the teacher has {num_layers} (0..{num_layers - 1})")
    return "explicit", blocks


def select_blocks(spec: str | None, num_layers: int, block_importance: list[float] | None) -> list[int]:
    """The teacher blocks (0-based, increasing) the student keeps."""
    kind, arg = parse_layers(spec, num_layers)
    if kind == "all":
        return list(range(num_layers))
    if kind == "every":
        assert isinstance(arg, int)
        return list(range(arg - 1, num_layers, arg))
    if kind == "importance":
        assert isinstance(arg, int) and block_importance is not None
        ranked = sorted(range(num_layers), key=lambda b: -block_importance[b])
        return sorted(ranked[:arg])
    assert isinstance(arg, list)
    return arg


def calibration_batches(tokenizer: Any, options: InitOptions) -> list[dict[str, Tensor]]:
    if options.data is None:
        raise HkdError("init-student: --layers importance:N and width pruning measure activations; give --data FILE "
                       "(JSONL calibration text)")
    config = DataConfig(kind="jsonl", path=options.data, prompt_field=options.prompt_field,
                        completion_field=options.completion_field, text_field=options.text_field,
                        batch_size=options.batch_size, max_length=options.max_length)
    encoded = encode_dataset(tokenizer, config, options.seed)
    data = Batches(encoded, config, tokenizer.pad_token_id or 0, options.seed)
    return [data.batch(i) for i in range(options.batches)]


def _hidden_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def measure_importance(model: PreTrainedModel, batches: list[dict[str, Tensor]]) -> Importance:
    """Block influence, channel, head and neuron magnitudes over the batches' real tokens."""
    layers = _layers_of(model)
    config = model.config
    num_heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // num_heads)
    sums: dict[str, Any] = {
        "block": torch.zeros(len(layers), dtype=torch.float64),
        "channels": torch.zeros(config.hidden_size, dtype=torch.float64),
        "heads": [torch.zeros(num_heads, dtype=torch.float64) for _ in layers],
        "neurons": [torch.zeros(config.intermediate_size, dtype=torch.float64) for _ in layers],
    }
    mask: dict[str, Tensor] = {}
    handles = []

    def real(t: Tensor) -> Tensor:  # [B, S, ...] -> [tokens, ...] over real (non-padding) positions
        return t.double()[mask["m"]]

    def on_block(index: int):
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(real(_hidden_input(args, kwargs)), real(out), dim=-1)
            sums["block"][index] += (1 - cos).sum()
        return hook

    def on_norm(module: Any, args: tuple[Any, ...], output: Tensor) -> None:
        sums["channels"] += real(output).abs().sum(0)

    def on_o_proj(index: int):
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            x = real(args[0])
            sums["heads"][index] += x.view(x.shape[0], num_heads, head_dim).norm(dim=-1).sum(0)
        return hook

    def on_down_proj(index: int):
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            sums["neurons"][index] += real(args[0]).abs().sum(0)
        return hook

    block: Any
    for index, block in enumerate(layers):
        handles.append(block.register_forward_hook(on_block(index), with_kwargs=True))
        handles.append(block.input_layernorm.register_forward_hook(on_norm))
        handles.append(block.post_attention_layernorm.register_forward_hook(on_norm))
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(on_o_proj(index)))
        handles.append(block.mlp.down_proj.register_forward_pre_hook(on_down_proj(index)))
    body: Any = model.model
    handles.append(body.norm.register_forward_hook(on_norm))
    tokens = 0
    device = next(model.parameters()).device
    try:
        for batch in batches:
            mask["m"] = batch["attention_mask"].bool().to(device)
            tokens += int(mask["m"].sum())
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise HkdError("init-student: the calibration batches hold no tokens")
    return Importance(
        block=(sums["block"] / tokens).tolist(),
        channels=sums["channels"] / tokens,
        heads=[h / tokens for h in sums["heads"]],
        neurons=[n / tokens for n in sums["neurons"]],
    )


def top_indices(scores: Tensor, keep: int) -> Tensor:
    """Indices of the ``keep`` largest scores, in their original order (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:keep]), dtype=torch.long)


def _check_size(name: str, value: int | None, teacher_value: int) -> int:
    if value is None:
        return teacher_value
    if not 1 <= value <= teacher_value:
        raise HkdError(f"--{name} {value}: must be in 1..{teacher_value} (the teacher's)")
    return value


def cut_state_dict(teacher: PreTrainedModel, blocks: list[int], channels: Tensor, heads: list[Tensor],
                   neurons: list[Tensor], head_dim: int, kv_groups: int, norm_scale: float) -> dict[str, Tensor]:
    """The student's weights: kept blocks renumbered, every matrix sliced to the kept units.

    ``heads[s]``/``neurons[s]`` are the kept query heads / MLP neurons of student block ``s``.
    Every parameter must be covered by a rule: an unknown one (another architecture) is an error.
    """
    source = teacher.state_dict()
    out: dict[str, Tensor] = {}

    def rows(index: Tensor, width: int) -> Tensor:  # head indices -> the rows of their head_dim slices
        return (index[:, None] * width + torch.arange(width)[None, :]).reshape(-1)

    for s, b in enumerate(blocks):
        q_rows = rows(heads[s], head_dim)
        kv_rows = rows(heads[s][::kv_groups] // kv_groups, head_dim)
        prefix, new = f"model.layers.{b}.", f"model.layers.{s}."
        for name in [k for k in source if k.startswith(prefix)]:
            w, leaf = source[name], name[len(prefix):]
            if leaf == "self_attn.q_proj.weight":
                w = w[q_rows][:, channels]
            elif leaf == "self_attn.q_proj.bias":
                w = w[q_rows]
            elif leaf in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
                w = w[kv_rows][:, channels]
            elif leaf in ("self_attn.k_proj.bias", "self_attn.v_proj.bias"):
                w = w[kv_rows]
            elif leaf == "self_attn.o_proj.weight":
                w = w[channels][:, q_rows]
            elif leaf in ("self_attn.o_proj.bias", "mlp.down_proj.bias"):
                w = w[channels]
            elif leaf in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                w = w[neurons[s]][:, channels]
            elif leaf in ("mlp.gate_proj.bias", "mlp.up_proj.bias"):
                w = w[neurons[s]]
            elif leaf == "mlp.down_proj.weight":
                w = w[channels][:, neurons[s]]
            elif leaf in ("input_layernorm.weight", "post_attention_layernorm.weight"):
                w = w[channels] * norm_scale
            else:
                raise HkdError(f"init-student: does not know how to cut {name!r} of {type(teacher).__name__}")
            out[new + leaf] = w.clone()
    for name, w in source.items():
        if name.startswith("model.layers."):
            continue
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            out[name] = w[:, channels].clone()
        elif name == "model.norm.weight":
            out[name] = (w[channels] * norm_scale).clone()
        else:
            raise HkdError(f"init-student: does not know how to cut {name!r} of {type(teacher).__name__}")
    return out


def init_student(teacher_dir: str | Path, out_dir: str | Path, options: InitOptions) -> Path:
    """Write the student cut from ``teacher_dir`` to ``out_dir`` (atomically) and return it."""
    out = Path(out_dir)
    if out.resolve() == Path(teacher_dir).resolve():
        raise HkdError("init-student: --out must not be the teacher's directory")
    check_output_dir(out, "--out", "init-student", owner=lambda p: (p / INIT_RECORD).is_file(),
                     why=f"it has no {INIT_RECORD}")
    check_number(options.batches, BATCHES, "--batches")  # the ranges the CLI parses these flags with
    check_number(options.seed, SEED, "--seed")
    for name in ("hidden", "intermediate", "heads"):
        if getattr(options, name) is not None:
            check_number(getattr(options, name), SIZE, f"--{name}")
    previous = _written_before(out)
    teacher, tokenizer = load_model(ModelConfig(path=str(teacher_dir)), "teacher")
    freeze(teacher)
    layers = _layers_of(teacher)
    config = teacher.config
    if options.share_layers is not None:
        raise HkdError(
            f"--share-layers: {type(teacher).__name__} has no cross-layer weight sharing in the Hugging Face format "
            "(ALBERT does), so a saved student would load with independent copies and lose the sharing; "
            "cut depth with --layers instead")
    num_layers = len(layers)
    hidden = _check_size("hidden", options.hidden, int(config.hidden_size))
    intermediate = _check_size("intermediate", options.intermediate, int(config.intermediate_size))
    num_heads = int(config.num_attention_heads)
    num_kv = int(getattr(config, "num_key_value_heads", None) or num_heads)
    group = num_heads // num_kv  # query heads per key/value head
    heads = _check_size("heads", options.heads, num_heads)
    if heads % group:
        raise HkdError(f"--heads {heads}: the teacher shares each key/value head among {group} query heads; "
                       f"keep a multiple of {group} so whole groups are kept")
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // num_heads)
    kind, _ = parse_layers(options.layers, num_layers)  # validate before any measuring
    needs_data = kind == "importance" or (hidden, intermediate, heads) != (
        config.hidden_size, config.intermediate_size, num_heads)
    importance = measure_importance(teacher, calibration_batches(tokenizer, options)) if needs_data else None
    blocks = select_blocks(options.layers, num_layers, importance.block if importance else None)

    if importance is not None:
        channels = top_indices(importance.channels, hidden)
        kept_heads = []
        for b in blocks:  # whole key/value groups, ranked by their query heads' summed magnitude
            groups = top_indices(importance.heads[b].view(num_kv, group).sum(1), heads // group)
            kept_heads.append((groups[:, None] * group + torch.arange(group)[None, :]).reshape(-1))
        kept_neurons = [top_indices(importance.neurons[b], intermediate) for b in blocks]
    else:
        channels = torch.arange(hidden)
        kept_heads = [torch.arange(heads) for _ in blocks]
        kept_neurons = [torch.arange(intermediate) for _ in blocks]
    state = cut_state_dict(teacher, blocks, channels, kept_heads, kept_neurons, head_dim, group,
                           math.sqrt(config.hidden_size / hidden))

    student_config = type(config).from_dict(config.to_dict())
    student_config.update({"num_hidden_layers": len(blocks), "hidden_size": hidden, "intermediate_size": intermediate,
                           "num_attention_heads": heads, "num_key_value_heads": heads // group, "head_dim": head_dim})
    if getattr(config, "rms_norm_eps", None) is not None:  # with the gain rescale: the norm is exact on inert channels
        student_config.rms_norm_eps = config.rms_norm_eps * config.hidden_size / hidden
    if isinstance(getattr(config, "layer_types", None), list):
        student_config.layer_types = [config.layer_types[b] for b in blocks]
    student = AutoModelForCausalLM.from_config(student_config, dtype=teacher.dtype)
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in getattr(student, "_tied_weights_keys", {})]
    if missing or unexpected:
        raise HkdError(f"init-student: cut weights do not fit the student (missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]})")

    record: dict[str, Any] = {
        "teacher": str(Path(teacher_dir).resolve()),
        "options": asdict(options),
        "teacher_blocks": blocks,  # 0-based teacher block of each student block
        "layer_map": [[0, 0]] + [[s + 1, b + 1] for s, b in enumerate(blocks)],
        "heads": [h.tolist() for h in kept_heads],
        "sizes": {"layers": len(blocks), "hidden": hidden, "intermediate": intermediate, "heads": heads,
                  "kv_heads": heads // group, "head_dim": head_dim},
        "block_importance": importance.block if importance else None,
        "params": {"teacher": sum(p.numel() for p in teacher.parameters()),
                   "student": sum(p.numel() for p in student.parameters())},
    }
    tmp = temp_dir_beside(out)  # a name of our own: never a folder of the user's
    try:
        student.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record["files"] = sorted([p.name for p in tmp.iterdir()] + [INIT_RECORD])  # what a re-run may replace
        (tmp / INIT_RECORD).write_text(json.dumps(record, indent=1))
        move_into(tmp, out, previous)  # files the user added to an earlier output stay
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _written_before(out: Path) -> list[str]:
    """The files an earlier ``init-student`` wrote into ``out`` (its record lists them), to be replaced by name."""
    try:
        files = json.loads((out / INIT_RECORD).read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [name for name in files if isinstance(name, str) and name and Path(name).name == name]


def read_init_record(model_dir: str | Path) -> dict[str, Any] | None:
    """The ``hkd-init.json`` of a student directory, or None when it was not cut by init-student."""
    path = Path(model_dir) / INIT_RECORD
    return json.loads(path.read_text()) if path.is_file() else None
