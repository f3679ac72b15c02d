"""The hkd plugin contract: every hook a plugin may implement.

A plugin is a plain module (or object) whose functions carry ``@hkd.hookimpl`` and are
named after the specs below. pluggy checks the signatures: an implementation may take any
subset of a spec's arguments, by name, so specs can grow arguments without breaking
plugins. Built-in plugins (``hkd.plugins.*``) are registered exactly like third-party ones,
which are found through the entry-point group ``hkd``.

Two kinds of hooks:

* **Registration hooks** (``hkd_add_*``) return things the core collects from every plugin:
  stage specs, kernel backends, verifiers, generation backends, prompt transforms. Each returns a list (or ``None``); the
  core concatenates the lists. Duplicate names are an error that names both plugins.
* **Lifecycle hooks** (``hkd_on_*``, ``hkd_after_step``) observe the run. They return
  nothing; an exception raised in one is reported with the plugin and hook name.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from hkd.sampling.augment import PromptTransformSpec
    from hkd.config import Config
    from hkd.sampling.backends import GenerationBackendSpec
    from hkd.kernels.registry import KernelBackend
    from hkd.plugin.stage import StageSpec
    from hkd.sampling.verify import VerifierSpec

hookspec = pluggy.HookspecMarker("hkd")
hookimpl = pluggy.HookimplMarker("hkd")


# --------------------------------------------------------------------------- registration


@hookspec
def hkd_add_stages() -> list[StageSpec] | None:
    """Return the distillation stages this plugin provides.

    Called once when the plugin manager is built. Each :class:`hkd.plugin.stage.StageSpec` names a
    stage (the key used under ``stages:`` and in phase weights), its config dataclass and a
    factory ``factory(config, context) -> hkd.plugin.stage.Stage``.
    """


@hookspec
def hkd_add_kernel_backends() -> list[KernelBackend] | None:
    """Return extra kernel backends (:class:`hkd.kernels.registry.KernelBackend`).

    Called once when the plugin manager is built. Each backend is registered for its op
    (``distill_loss`` or ``fused_linear_distill_loss``) under its name; config selects it
    with ``kernels: {OP: NAME}`` and ``auto`` may pick it by priority.
    """


@hookspec
def hkd_add_verifiers() -> list[VerifierSpec] | None:
    """Return verifiers (:class:`hkd.sampling.verify.VerifierSpec`) used by data distillation and eval.

    A verifier scores a completion for a prompt record; ``hkd generate`` keeps completions
    that every configured verifier accepts.
    """


@hookspec
def hkd_add_generation_backends() -> list[GenerationBackendSpec] | None:
    """Return generation backends (:class:`hkd.sampling.backends.GenerationBackendSpec`): who samples text.

    ``hkd generate`` (``backend:``), pseudo-labelling, the RL stage and the on-policy stage
    (``stages.<name>.generation_backend``) look a backend up by name; the built-in one is ``transformers``
    (the live model's ``generate`` with the KV cache). A spec's factory is called as
    ``factory(context, **backend_options)`` with a :class:`hkd.sampling.backends.GenerationContext`
    (tokenizer, live model if any, model directory, device) and returns an object with
    ``generate(prompts, params) -> hkd.sampling.hf_sampler.Samples``: ``params.n`` completions per prompt,
    prompt-major, with token ids, masks, texts and the log-probability of each sampled token
    under the sampling distribution (temperature and top-p applied; 0 for greedy). ``prompts`` is
    a :class:`hkd.sampling.backends.PromptBatch` of token ids (rendered once by the caller, chat
    template included) when the spec sets ``takes_token_ids=True``; a backend written before
    (the default, ``False``) gets them decoded to texts. A sample ends at EOS or one of
    ``params.stop_token_ids`` (the chat template's end-of-turn token). An engine
    that keeps its own copy of the weights also implements ``sync_weights(model)``, which a
    trainer calls before sampling from a model it has updated. Set ``needs_model=False`` on
    the spec when the backend loads its own weights from ``context.model_path``, so that
    ``hkd generate`` does not load the model into its own process as well.
    """


@hookspec
def hkd_add_prompt_transforms() -> list[PromptTransformSpec] | None:
    """Return prompt transforms (:class:`hkd.sampling.augment.PromptTransformSpec`) for augmentation.

    ``hkd generate`` with ``augment: [{name, variants, options}]`` builds each as
    ``factory(context, **options)`` (:class:`hkd.sampling.augment.TransformContext`) and calls it as
    ``transform(record, rng, count) -> list[record]``: up to ``count`` new prompt records
    made from ``record``, drawing randomness only from ``rng`` (seeded per prompt, so a
    resumed run makes the same variants). A transform that can compute a variant's answer
    sets ``answer_field``; one that cannot drops it (pseudo-labelling can fill it). Built-ins:
    ``arith_operands`` (new operands for the arithmetic task's prompts) and ``mlm_replace``
    (TinyBERT-style word replacement proposed by a masked-LM).
    """


# --------------------------------------------------------------------------- lifecycle


@hookspec
def hkd_on_train_start(
    config: Config, run_dir: Path, student: torch.nn.Module, teacher: torch.nn.Module | None, start_step: int,
    total_steps: int, resumed_from: Path | None,
) -> None:
    """Called once after models, stages and optimizer exist, before the first step (rank 0 only).

    ``start_step`` is 0 for a fresh run and the checkpoint's step on ``--resume``, when
    ``resumed_from`` is the checkpoint directory (``None`` for a fresh run). ``total_steps``
    is the schedule's length. ``teacher`` is the first teacher's model (an architecture without
    weights when it comes from an offline cache).
    """


@hookspec
def hkd_on_phase_start(phase_name: str, phase_index: int, step: int, active_stages: list[str]) -> None:
    """Called when the schedule enters a phase (also for the phase a resumed run starts in)."""


@hookspec
def hkd_after_step(step: int, metrics: dict[str, float], run_dir: Path) -> None:
    """Called after every optimizer step with that step's metrics.

    ``metrics`` holds ``loss``, ``loss/<stage>`` and ``weight/<stage>`` for each active
    stage, ``temperature``, ``lr``, ``grad_norm``, ``tokens`` and ``tokens_per_s``.
    Loggers, plots and early-stopping plugins live here.
    """


@hookspec
def hkd_on_checkpoint(step: int, path: Path) -> None:
    """Called after a checkpoint directory has been written and atomically renamed into place."""


@hookspec
def hkd_on_train_end(step: int, run_dir: Path, final_dir: Path, metrics: dict[str, Any]) -> None:
    """Called once after the last step, when the final student is saved in ``final_dir``."""
