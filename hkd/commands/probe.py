"""``hkd probe RUN_DIR``: how similar is every student layer to every teacher layer?

The training diagnostic (``log_layers: true``) measures only the pairs a layer map
connects. Choosing a layer map is the question before that: which teacher layer does each
student layer resemble, at initialisation and after distillation? ``hkd probe`` answers it
for a run's student at a checkpoint (``--step``; 0 = the initial weights) on a few batches
of the run's own data, with two width- and head-count-agnostic measures:

* **hidden states: linear CKA** (Kornblith et al. 2019) between student layer ``s`` and
  teacher layer ``t`` over all target tokens, ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``
  with column-centred token matrices. 1 = the same representation up to rotation and
  scale, 0 = unrelated. Layers include 0, the embedding output.
* **attention: KL(teacher || student)** between head-averaged attention distributions of
  each query (the ``heads: average`` comparison of the structural stage), per target
  token. 0 = the same attention pattern. Blocks 1..L.

The matrices (teacher layer rows x student layer columns) and the pairs the run's layer
maps connect go to ``RUN_DIR/probe/step-NNNNNNNN.json``; ``hkd report`` draws them as
heatmaps with the mapped pairs outlined.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from hkd.train import checkpoint as ckpt
from hkd.config import Config, from_dict, load_yaml
from hkd.config.flags import BATCHES, STEP, check_number
from hkd.config.outputs import check_output_dir, check_output_file, write_text_atomic
from hkd.data.encoding import Batches, encode_dataset
from hkd.errors import ConfigError, HkdError, warn
from hkd.models.layermap import LayerMapConfig, build_layer_map
from hkd.models.loading import freeze, load_model, safetensors_shapes
from hkd.kernels.divergence import kl_divergence
from hkd.models.taps import TapRequest, enable_taps, forward_with_taps
from hkd.plugin.manager import build_manager
from hkd.plugin.stage import available_stages


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA between token matrices ``x`` ``[N, Dx]`` and ``y`` ``[N, Dy]`` (float64)."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).pow(2).sum()
    norm = (x.T @ x).norm() * (y.T @ y).norm()
    return float(cross / norm) if norm > 0 else 0.0


def averaged_attention_logp(qkv: Any) -> Tensor:
    """Head-averaged attention ``[B, S, S]`` as log-probabilities, masked keys at -inf."""
    allowed = qkv.allowed()[:, 0]
    averaged = qkv.attention_logprobs().exp().mean(1).clamp_min(1e-30).log()
    return averaged.masked_fill(~allowed, float("-inf"))


def choose_checkpoint(run_dir: Path, step: int | None) -> tuple[int, Path | None]:
    """``(step, checkpoint dir)``: the newest by default, ``None`` for step 0 (initial weights)."""
    if step == 0:
        return 0, None
    found = {int(p.name.split("-")[-1]): p for p in ckpt.list_checkpoints(run_dir / "checkpoints")}
    if not found:
        raise HkdError(f"probe: no checkpoint in {str(run_dir / 'checkpoints')!r}; use --step 0 for the initial student")
    if step is None:
        step = max(found)
    if step not in found:
        raise HkdError(f"probe: no checkpoint for step {step} in {str(run_dir)!r}; available: {sorted(found)} (or 0)")
    return step, found[step]


def mapped_pairs(config: Config, student_layers: int, teacher_layers: int, student_dir: str | None) -> dict[str, list[list[int]]]:
    """The (student, teacher) pairs each scheduled stage with a layer map maps, read through the stage's
    own config dataclass (its defaults included: ``hidden`` maps with ``auto``)."""
    specs = available_stages(build_manager(config.plugins.disable))
    names = dict.fromkeys(n for phase in config.schedule.phases for n in phase.stages)
    mapped = {}
    for name in names:
        spec = specs.get(name)
        if spec is None:
            continue
        try:  # the outlines are an annotation: a map that cannot be rebuilt is named and left out
            options: Any = from_dict(spec.config_cls, config.stages.get(name) or {}, f"stages.{name}")
            layer_map = getattr(options, "layer_map", None)
            if isinstance(layer_map, LayerMapConfig):
                pairs = build_layer_map(layer_map.strategy, student_layers, teacher_layers, pairs=layer_map.pairs,
                                        include_embeddings=bool(getattr(options, "include_embeddings", False)),
                                        where=f"stages.{name}.layer_map", student_dir=student_dir)
                mapped[name] = [[s, t] for s, t in pairs]
        except HkdError as exc:
            warn(f"probe: the {name!r} stage's mapped pairs are not outlined: {exc}")
    return mapped


def run_config(run_dir: Path, trust_remote_code: bool = False, allow_pickle: bool = False) -> Config:
    """The run's saved config, with code execution opted into only by the caller, never by the file.

    A run directory may come from someone else: ``trust_remote_code`` or ``allow_pickle`` in
    its ``config.yaml`` would run code from its model directories. Both are taken from the
    command line (``--trust-remote-code``, ``--allow-pickle``) instead.
    """
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise HkdError(f"probe: {str(config_path)!r} does not exist; is {str(run_dir)!r} a run directory?")
    try:
        config = from_dict(Config, load_yaml(config_path.read_text(encoding="utf-8"), str(config_path)) or {})
    except UnicodeDecodeError:
        raise HkdError(f"probe: {str(config_path)!r} is not UTF-8 text") from None
    except ConfigError as exc:  # edited, or written by another hkd version: the file is named with the key
        where = "" if str(config_path) in str(exc) else f"{str(config_path)!r}: "
        raise HkdError(f"probe: {where}{exc}") from None
    for model in (config.teacher, config.student):
        model.trust_remote_code = trust_remote_code
        model.allow_pickle = allow_pickle
    return config


def probe(run_dir: Path, step: int | None = None, batches: int = 4, progress: bool = True, *,
          trust_remote_code: bool = False, allow_pickle: bool = False, final: bool = False) -> Path:
    """Compute both matrices for the student at ``step`` (or the run's ``final/`` model with
    ``final``, e.g. after its checkpoints were deleted) and write them as JSON; return the path."""
    check_number(batches, BATCHES, "probe --batches")  # the ranges hkd probe's flags are parsed with
    if step is not None:
        check_number(step, STEP, "probe --step")
    if final and step is not None:
        raise HkdError("probe: --final probes the run's final/ model; it takes no --step")
    config = run_config(run_dir, trust_remote_code, allow_pickle)
    step, checkpoint = (-1, None) if final else choose_checkpoint(run_dir, step)
    out = run_dir / "probe" / ("final.json" if final else f"step-{step:08d}.json")
    check_output_dir(out.parent, "probe output", "probe", owner=lambda p: True)  # RUN_DIR/probe is probe's own
    check_output_file(out, "probe output", "probe", owner=lambda p: True)
    teacher, teacher_tok = load_model(config.teacher, "teacher", run_dir)
    if final:  # final/ is a whole model: the student's original directory is not needed (it may be gone)
        final_dir = run_dir / "final"
        if not (final_dir / "config.json").is_file():
            raise HkdError(f"probe --final: {str(final_dir)!r} holds no model (the run has not finished?)")
        student, student_tok = load_model(dataclasses.replace(config.student, path=str(final_dir), preset=None),
                                          "student")
        original = config.student.path  # where a cut student's layer record (hkd-init.json) lies, as distill read it
        student_dir = original if original is not None and Path(original).is_dir() else None
    else:
        student, student_tok = load_model(config.student, "student", run_dir)
        student_dir = getattr(student.config, "name_or_path", None)  # where a cut student's layer record lies
    if checkpoint is not None:
        weights = checkpoint / "student.safetensors"
        try:
            safetensors_shapes(weights)
            student.load_state_dict(load_file(str(weights)))
        except (HkdError, RuntimeError, OSError) as exc:
            raise HkdError(f"probe: checkpoint {str(checkpoint)!r} does not fit the run's student: "
                           f"{' '.join(str(exc).split())[:500]}") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for model in (teacher, student):
        freeze(model).to(device)  # type: ignore[arg-type]
        enable_taps(model)
    tokenizer = student_tok or teacher_tok
    encoded = encode_dataset(tokenizer, config.data, config.train.seed)
    data = Batches(encoded, config.data, tokenizer.pad_token_id or 0, config.train.seed, not config.student.encoder)
    teacher_layers, student_layers = teacher.config.num_hidden_layers, student.config.num_hidden_layers
    request = TapRequest(hidden=set(range(teacher_layers + 1)), attention=set(range(1, teacher_layers + 1)))
    student_request = TapRequest(hidden=set(range(student_layers + 1)), attention=set(range(1, student_layers + 1)))

    teacher_tokens: list[list[Tensor]] = [[] for _ in range(teacher_layers + 1)]
    student_tokens: list[list[Tensor]] = [[] for _ in range(student_layers + 1)]
    kl_sums = torch.zeros(teacher_layers, student_layers, dtype=torch.float64)
    tokens = 0
    for index in tqdm(range(batches), desc="probe", disable=not progress, unit="batch"):
        batch = {k: v.to(device) for k, v in data.batch(index).items()}
        mask = batch["loss_mask"].bool()
        with torch.no_grad():
            t_view = forward_with_taps(teacher, batch, request)
            s_view = forward_with_taps(student, batch, student_request)
        assert t_view.hidden_states is not None and s_view.hidden_states is not None
        for tokens_by_layer, states in ((teacher_tokens, t_view.hidden_states), (student_tokens, s_view.hidden_states)):
            for layer, hidden in enumerate(states):
                assert hidden is not None  # a live forward fills every layer
                tokens_by_layer[layer].append(hidden[mask].float().cpu())
        t_logp = {t: averaged_attention_logp(t_view.attention[t]) for t in range(1, teacher_layers + 1)}
        for s in range(1, student_layers + 1):
            s_logp = averaged_attention_logp(s_view.attention[s])
            for t, logp in t_logp.items():
                kl_sums[t - 1, s - 1] += float((kl_divergence(logp, s_logp) * mask).sum())
        tokens += int(mask.sum())
    if tokens == 0:
        raise HkdError(f"probe: the first {batches} batches have no target tokens; raise --batches")
    teacher_matrix = [torch.cat(chunks) for chunks in teacher_tokens]
    student_matrix = [torch.cat(chunks) for chunks in student_tokens]
    result = {
        "step": step,  # -1 with final
        "final": final,
        "batches": batches,
        "tokens": tokens,
        "teacher_layers": teacher_layers,
        "student_layers": student_layers,
        "hidden_cka": [[linear_cka(x, y) for x in student_matrix] for y in teacher_matrix],
        "attention_kl": (kl_sums / tokens).tolist(),
        "mapped": mapped_pairs(config, student_layers, teacher_layers, student_dir),
    }
    write_text_atomic(out, json.dumps(result, indent=1))
    return out
