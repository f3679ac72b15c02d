"""The offline teacher cache reads ahead: micro-batch N+1's targets are gathered on a reader thread while N
trains, the step only copies finished host tensors, and a resumed run is exact."""

from __future__ import annotations

import shutil
import threading

from safetensors.torch import load_file

from hkd.config import Config, from_dict
from hkd.teachers.cache import TeacherCache
from hkd.teachers.sources import CachedTeacher
from hkd.train.loop import build_run, distill, train_step
from tests.stage_runs import scenario_config


def test_cached_targets_are_read_ahead_on_the_reader_thread(tmp_path, monkeypatch):
    # catches: shard reads, per-row nonzero() and tolist() back inside the step (on the step's thread, or only
    # when the view is asked for), and a read ahead that is wasted (the view reads the micro-batch again)
    raw = scenario_config("teacher_cache", tmp_path, steps=3, grad_accum=2)
    run = build_run(from_dict(Config, raw), tmp_path / "run")
    events: list[tuple[str, object]] = []
    read, view = TeacherCache.read, CachedTeacher.view

    def reading(self, host_batch, request, pin=False):  # type: ignore[no-untyped-def]
        events.append(("read", (threading.current_thread().name, tuple(host_batch["example_index"].tolist()))))
        return read(self, host_batch, request, pin)

    def viewing(self, batch, request, host_batch=None):  # type: ignore[no-untyped-def]
        events.append(("view", tuple(batch["example_index"].tolist())))
        return view(self, batch, request, host_batch)

    monkeypatch.setattr(TeacherCache, "read", reading)
    monkeypatch.setattr(CachedTeacher, "view", viewing)
    for step in range(3):
        train_step(run, step)
    monkeypatch.undo()
    reads = [e for kind, e in events if kind == "read"]
    views = [e for kind, e in events if kind == "view"]
    assert len(views) == 6 and len(reads) == 6  # every micro-batch read exactly once
    assert all(thread.startswith("hkd-cache-reader") for thread, _ in reads)
    assert [examples for _, examples in reads] == views  # read in the order they are used


def test_the_next_micro_batch_is_queued_before_the_current_one_is_used(tmp_path, monkeypatch):
    # catches: a "prefetch" that only starts reading when the view is requested (nothing overlaps the step)
    raw = scenario_config("teacher_cache", tmp_path, steps=2, grad_accum=2)
    run = build_run(from_dict(Config, raw), tmp_path / "run")
    log: list[tuple[str, tuple[int, ...]]] = []
    prefetch, view = CachedTeacher.prefetch, CachedTeacher.view

    def queueing(self, host_batch, request, device):  # type: ignore[no-untyped-def]
        log.append(("queued", tuple(host_batch["example_index"].tolist())))
        return prefetch(self, host_batch, request, device)

    def viewing(self, batch, request, host_batch=None):  # type: ignore[no-untyped-def]
        log.append(("used", tuple(batch["example_index"].tolist())))
        return view(self, batch, request, host_batch)

    monkeypatch.setattr(CachedTeacher, "prefetch", queueing)
    monkeypatch.setattr(CachedTeacher, "view", viewing)
    train_step(run, 0)
    train_step(run, 1)
    monkeypatch.undo()
    used = [examples for kind, examples in log if kind == "used"]
    assert len(used) == 4
    for previous, current in zip(used, used[1:]):
        # micro-batch k+1 (at a step's last, the next step's first) was queued before micro-batch k was used
        assert log.index(("queued", current)) < log.index(("used", previous)), log


def test_training_from_a_cache_resumes_exactly(tmp_path):
    # catches: read-ahead state that a resumed run lacks or that shifts its targets (a resume must equal the
    # uninterrupted run, losses and weights)
    raw = scenario_config("teacher_cache", tmp_path, steps=4, grad_accum=2, checkpoint_every=2)
    straight = distill(from_dict(Config, raw), tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000004")
    shutil.rmtree(tmp_path / "b" / "final")
    resumed = distill(from_dict(Config, raw), tmp_path / "b", resume=True)
    assert resumed.last_metrics["loss"] == straight.last_metrics["loss"]
    a, b = load_file(str(straight.final_dir / "model.safetensors")), load_file(str(resumed.final_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_the_host_read_gives_the_view_of_the_whole_batch(tmp_path):
    # catches: the split read/to_view serving other targets than the one-call view (ids widened, rows shifted)
    import torch

    raw = scenario_config("teacher_cache", tmp_path, steps=1)
    run = build_run(from_dict(Config, raw), tmp_path / "run")
    source = run.teachers[0]
    assert isinstance(source, CachedTeacher)
    batch = run.batches.batch(0)
    request = run.stages["logits"].teacher_request().merge(run.stages["hidden"].teacher_request())
    direct = source.cache.view(batch, request)
    split = source.view(batch, request, host_batch=batch)
    assert direct.sparse is not None and split.sparse is not None
    assert split.sparse.ids.dtype == torch.long and torch.equal(direct.sparse.ids, split.sparse.ids)
    assert torch.equal(direct.sparse.values, split.sparse.values)
    assert all(torch.equal(x, y) for x, y in zip(direct.hidden_states, split.hidden_states) if x is not None)
