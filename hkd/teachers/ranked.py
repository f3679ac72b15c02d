"""A teacher on its own torchrun ranks (``teacher.placement: ranks``): the wire, the student's source,
and the teacher rank's loop.

Student ranks never hold the teacher: they see it through :class:`RemoteTeacher`, a
:class:`hkd.teachers.sources.TeacherSource` whose ``view`` is what a teacher rank computed for
exactly this micro-batch and sent over ``torch.distributed`` point-to-point. A teacher rank
(:func:`serve`) reads the data itself (micro-batches are a pure function of seed and index), runs
its forward for the micro-batches of the student ranks it serves, in the order they consume them,
and sends only what the phase's active stages ask:

* ``hidden.<L>``: the hidden state of each mapped layer ``[B, S, H]`` (all positions, as computed);
* ``attn.<L>.query|key|value|mask|sinks``: q/k/v of each requested block, with the mask the
  attention function got (:class:`hkd.models.taps.QKV`; its scalars travel in the header);
* ``logits`` ``[B, S, V]`` (``teacher.transfer: full``), or, with ``transfer: topk``, the rows at
  ``loss_mask`` positions as the offline cache stores them (:func:`hkd.teachers.cache.topk_targets`:
  top-k values fp32, ids int32, ``logsumexp(logits / T)`` at the step's temperature) scattered back
  into ``[B, S, k]`` on the student side exactly as :meth:`hkd.teachers.cache.TeacherCache.view` does.

One message = a small header and JSON description on a CPU (gloo) group, then one flat byte payload
on the device group (NCCL on GPU, gloo on CPU). The header's gloo send is a rendezvous: it completes
only when the student's receiver thread posts its receive, which it does only while its queue has
room (``teacher.run_ahead`` micro-batches), so a teacher rank computes at most that far ahead, plus the
one it is sending.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor
from transformers import PreTrainedModel

from hkd.errors import HkdError
from hkd.models.loading import num_layers
from hkd.models.taps import QKV, forward_with_taps
from hkd.models.view import ModelView, SparseTargets, TapRequest
from hkd.teachers.cache import topk_targets

VIEW, END, ERROR = 1, 2, 3
ALIGN = 16  # payload offsets are multiples of this, so every tensor can be a view of the buffer
DTYPES = {str(t).removeprefix("torch."): t for t in (torch.float32, torch.bfloat16, torch.float16, torch.float64,
                                                      torch.int64, torch.int32, torch.bool, torch.uint8)}
_QKV_TENSORS = ("query", "key", "value", "mask", "sinks")
_QKV_SCALARS = ("scaling", "causal", "softcap", "sliding_window", "dropout")


# --------------------------------------------------------------------------- requests on the wire


def request_to_json(request: TapRequest) -> dict[str, Any]:
    return {"hidden": sorted(request.hidden), "attention": sorted(request.attention), "logits": request.logits,
            "final_hidden": request.final_hidden, "sparse_logits": request.sparse_logits,
            "sparse_logsumexp": request.sparse_logsumexp}


def request_from_json(data: dict[str, Any]) -> TapRequest:
    return TapRequest(hidden=set(data["hidden"]), attention=set(data["attention"]), logits=data["logits"],
                      final_hidden=data["final_hidden"], sparse_logits=data["sparse_logits"],
                      sparse_logsumexp=data["sparse_logsumexp"])


def ranked_serves(model: PreTrainedModel, transfer: str) -> TapRequest:
    """What a teacher on its own ranks can send: every hidden layer and attention block, and logits in
    full or as top-k with the exact log-normaliser (at any temperature: the teacher rank computes it
    at each step's). Never the LM head's input: the fused loss would need the teacher's head weights
    on the student rank."""
    layers = num_layers(model)
    has_head = getattr(model, "lm_head", None) is not None
    return TapRequest(hidden=set(range(layers + 1)), attention=set(range(1, layers + 1)),
                      logits=has_head and transfer == "full",
                      sparse_logits=has_head and transfer == "topk", sparse_logsumexp=has_head and transfer == "topk")


# --------------------------------------------------------------------------- one message


@dataclass
class Channel:
    """The groups between one teacher rank and one student rank (global rank numbers)."""

    meta_group: Any  # gloo: header and description (host memory, no device sync)
    data_group: Any  # the payload's backend (NCCL on GPU)
    peer: int
    device: torch.device


def pack(tensors: list[Tensor], device: torch.device) -> Tensor:
    """One uint8 buffer holding every tensor, each at an offset that is a multiple of :data:`ALIGN`."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    total = sum(-(-size // ALIGN) * ALIGN for size in sizes)
    buffer = torch.empty(total, dtype=torch.uint8, device=device)
    offset = 0
    for tensor, size in zip(tensors, sizes):
        if size:
            buffer[offset: offset + size] = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        offset += -(-size // ALIGN) * ALIGN
    return buffer


def unpack(buffer: Tensor, specs: list[list[Any]]) -> dict[str, Tensor]:
    """``{name: tensor}`` viewed out of ``buffer`` from ``[name, dtype, shape]`` entries (no copies)."""
    out, offset = {}, 0
    for name, dtype_name, shape in specs:
        dtype = DTYPES[dtype_name]
        numel = 1
        for dim in shape:
            numel *= dim
        size = numel * torch.empty((), dtype=dtype).element_size()
        out[name] = buffer[offset: offset + size].view(dtype).reshape(shape)
        offset += -(-size // ALIGN) * ALIGN
    return out


def send_message(channel: Channel, kind: int, meta: dict[str, Any], tensors: dict[str, Tensor] | None = None) -> None:
    tensors = tensors or {}
    meta = {**meta, "tensors": [[name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in tensors.items()]}
    text = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
    payload = pack(list(tensors.values()), channel.device)
    dist.send(torch.tensor([kind, text.numel(), payload.numel()], dtype=torch.int64), channel.peer,
              group=channel.meta_group)
    dist.send(text, channel.peer, group=channel.meta_group)
    if payload.numel():
        dist.send(payload, channel.peer, group=channel.data_group)


def receive_message(channel: Channel) -> tuple[int, dict[str, Any], Tensor | None]:
    header = torch.empty(3, dtype=torch.int64)
    dist.recv(header, channel.peer, group=channel.meta_group)
    kind, text_len, payload_len = header.tolist()
    text = torch.empty(text_len, dtype=torch.uint8)
    dist.recv(text, channel.peer, group=channel.meta_group)
    meta = json.loads(bytes(text.numpy()).decode())
    payload = None
    if payload_len:
        payload = torch.empty(payload_len, dtype=torch.uint8, device=channel.device)
        dist.recv(payload, channel.peer, group=channel.data_group)
    return kind, meta, payload


# --------------------------------------------------------------------------- views <-> messages


def encode_view(view: ModelView, batch: dict[str, Tensor], request: TapRequest, top_k: int,
                temperature: float) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """What a teacher rank sends for one micro-batch: exactly ``request`` (and nothing it did not ask)."""
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {"logit_softcap": view.logit_softcap, "attention": {}}
    for layer in sorted(request.hidden):
        state = view.hidden_states[layer] if view.hidden_states is not None else None
        assert state is not None
        tensors[f"hidden.{layer}"] = state
    for layer in sorted(request.attention):
        qkv = view.attention[layer]
        for name in _QKV_TENSORS:
            value = getattr(qkv, name)
            if isinstance(value, Tensor):
                tensors[f"attn.{layer}.{name}"] = value
        meta["attention"][str(layer)] = {name: getattr(qkv, name) for name in _QKV_SCALARS}
    if request.logits:
        assert view.logits is not None
        tensors["logits"] = view.logits
    if request.sparse_logits:
        assert view.logits is not None
        rows = topk_targets(view.logits[batch["loss_mask"]], top_k, temperature)  # as the offline cache stores them
        tensors.update({name: value.to(view.logits.device) for name, value in rows.items()})
        meta["temperature"] = temperature
    return meta, tensors


def decode_view(meta: dict[str, Any], tensors: dict[str, Tensor], batch: dict[str, Tensor],
                request: TapRequest) -> ModelView:
    """The student's :class:`ModelView` of one message (what :func:`encode_view` sent)."""
    hidden = {layer: tensors[f"hidden.{layer}"] for layer in request.hidden}
    states = tuple(hidden.get(layer) for layer in range(max(hidden, default=-1) + 1)) if hidden else None
    attention = {}
    for layer in request.attention:
        scalars = meta["attention"][str(layer)]
        parts = {name: tensors.get(f"attn.{layer}.{name}") for name in _QKV_TENSORS}
        attention[layer] = QKV(parts["query"], parts["key"], parts["value"], parts["mask"],  # type: ignore[arg-type]
                               sinks=parts["sinks"], **scalars)
    sparse = None
    if request.sparse_logits:  # scattered to the loss_mask positions as TeacherCache.view does
        mask = batch["loss_mask"].bool()
        k = tensors["topk_values"].shape[-1]
        values = torch.zeros(tuple(mask.shape) + (k,), device=mask.device)
        ids = torch.zeros(tuple(mask.shape) + (k,), dtype=torch.long, device=mask.device)
        values[mask] = tensors["topk_values"]
        ids[mask] = tensors["topk_ids"].long()
        lse = None
        if request.sparse_logsumexp:
            lse = torch.zeros(tuple(mask.shape), device=mask.device)
            lse[mask] = tensors["logsumexp"]
        sparse = SparseTargets(ids, values, lse, temperature=float(meta["temperature"]), kind="topk")
    return ModelView(hidden_states=states, attention=attention, logits=tensors.get("logits"), sparse=sparse,
                     logit_softcap=meta["logit_softcap"])


# --------------------------------------------------------------------------- the student's side


class Receiver:
    """A thread that receives one teacher rank's messages into a queue of at most ``depth`` micro-batches.

    It posts a receive only while fewer than ``depth`` received views wait to be taken: the teacher
    rank's send completes only then, so it is at most ``depth + 1`` micro-batches ahead of the
    student (``depth`` received, one computed and waiting to be sent). ``close()`` takes what is
    still in flight until the teacher rank's end message.
    """

    def __init__(self, channel: Channel, depth: int, who: str, timeout_s: float) -> None:
        self.channel = channel
        self.who = who
        self.timeout_s = timeout_s
        self.queue: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.slots = threading.Semaphore(depth)  # a receive is posted only with a free slot
        self.draining = threading.Event()
        self.failure: BaseException | None = None  # why the thread stopped receiving, if not an end message
        self.waited_s = 0.0  # time the student spent waiting for views (the teacher rank was slower)
        self.stream = torch.cuda.Stream(channel.device) if channel.device.type == "cuda" else None
        self.thread = threading.Thread(target=self._run, name=f"hkd-recv-{channel.peer}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                while not self.slots.acquire(timeout=0.05):
                    if self.draining.is_set():  # the run has stopped: take what is in flight, keep nothing
                        break
                if self.stream is not None:
                    with torch.cuda.stream(self.stream):
                        kind, meta, payload = receive_message(self.channel)
                        event = torch.cuda.Event()
                        event.record(self.stream)
                else:
                    (kind, meta, payload), event = receive_message(self.channel), None
                self._put((kind, meta, payload, event))
                if kind in (END, ERROR):
                    return
        except Exception as exc:  # the teacher rank died or the group timed out
            self.failure = exc
            self._put(("failed", exc, None, None), force=True)

    def _put(self, item: tuple[Any, ...], force: bool = False) -> None:
        if self.draining.is_set() and not force and item[0] == VIEW:
            return  # the run has stopped: what is still in flight is dropped
        self.queue.put(item)

    def next(self) -> tuple[dict[str, Any], Tensor | None]:
        began = time.perf_counter()
        try:
            return self._next()
        finally:
            self.waited_s += time.perf_counter() - began

    def _next(self) -> tuple[dict[str, Any], Tensor | None]:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                kind, meta, payload, event = self.queue.get(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
                break
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise HkdError(f"{self.who} sent nothing for {self.timeout_s:g} s (teacher.timeout_s): it died, "
                                   "hangs or is far slower than the students; see its own output") from None
        self.slots.release()
        if kind == "failed":
            raise HkdError(f"{self.who} stopped answering: {' '.join(str(meta).split()) or type(meta).__name__} "
                           "(did its process die? see its own output)")
        if kind == ERROR:
            raise HkdError(f"{self.who} failed: {meta['message']}")
        if kind == END:
            raise HkdError(f"{self.who} ended its run before the students (at step {meta.get('step')}); "
                           "student and teacher ranks disagree on the schedule")
        if event is not None:
            torch.cuda.current_stream(self.channel.device).wait_event(event)
            assert payload is not None
            payload.record_stream(torch.cuda.current_stream(self.channel.device))
        return meta, payload

    def close(self, timeout_s: float) -> bool:
        """Stop taking views; wait for the teacher rank's end message. ``False``: it never came."""
        self.draining.set()
        deadline = time.monotonic() + timeout_s
        while self.thread.is_alive() and time.monotonic() < deadline:
            try:
                while True:
                    self.queue.get_nowait()
            except queue.Empty:
                pass
            self.thread.join(timeout=0.05)
        return not self.thread.is_alive()


class RemoteTeacher:
    """A teacher that runs on other ranks; ``model`` is its architecture on the meta device."""

    live = False  # no weights here: stages that run the teacher themselves refuse it by name

    def __init__(self, model: PreTrainedModel, name: str, receiver: Receiver, transfer: str) -> None:
        self.model = model
        self.name = name
        self.receiver = receiver
        self.transfer = transfer
        self.received = 0

    def serves(self) -> TapRequest:
        return ranked_serves(self.model, self.transfer)

    def view(self, batch: dict[str, Tensor], request: TapRequest,
             host_batch: dict[str, Tensor] | None = None) -> ModelView:
        meta, payload = self.receiver.next()
        self.received += 1
        sent = request_from_json(meta["request"])
        if sent != request:
            raise HkdError(f"{self.receiver.who} sent {request_to_json(sent)} for step {meta['step'] + 1}, micro-batch "
                           f"{meta['micro']}, but the step asks {request_to_json(request)} (an hkd bug: please report)")
        shape = list(batch["input_ids"].shape)
        examples = (host_batch or batch)["example_index"]  # the host copy: no device read
        if meta["shape"] != shape or (examples.device.type == "cpu" and examples.tolist() != meta["examples"]):
            raise HkdError(f"{self.receiver.who} computed examples {meta['examples']} ({meta['shape']}) but the "
                           f"student's micro-batch differs ({shape}): a stage passed the teacher a batch that is not "
                           "the data's micro-batch, which a teacher on its own ranks cannot see")
        tensors = unpack(payload, meta["tensors"]) if payload is not None else {}
        return decode_view(meta, tensors, batch, request)


# --------------------------------------------------------------------------- the teacher rank's side


@dataclass
class Work:
    """What a teacher rank computes: ``(step, student rank, micro-batch, data index)`` in sending order
    (each student's micro-batches in its order; the students served take turns)."""

    start_step: int
    total_steps: int
    segments: list[tuple[int, int, dict[str, Any]]]  # [first step, end step) -> request (JSON) for this teacher
    students: list[int]  # student ranks served (their number among the students)
    student_world: int
    grad_accum: int

    def request_at(self, step: int) -> TapRequest:
        for first, end, request in self.segments:
            if first <= step < end:
                return request_from_json(request)
        raise HkdError(f"teacher rank: no request for step {step + 1}")  # pragma: no cover - segments cover the run

    def items(self) -> Any:
        for step in range(self.start_step, self.total_steps):
            request = self.request_at(step)
            if request.empty():
                continue
            for micro in range(self.grad_accum):  # students in turn, so none waits for another's whole step
                for student in self.students:
                    first = (step * self.student_world + student) * self.grad_accum  # as train_step reads them
                    yield step, student, micro, first + micro, request


@dataclass
class ServeStats:
    sent: int = 0
    bytes: int = 0
    compute_s: float = 0.0
    send_s: float = 0.0
    stopped_at: int | None = None
    steps: int = 0  # the steps served: the last one's number (1-based)
    notes: list[str] = field(default_factory=list)


def serve(model: PreTrainedModel, batch_at: Callable[[int], dict[str, Tensor]], work: Work,
          channels: dict[int, Channel], temperature_at: Callable[[int], float], top_k: int,
          autocast: Callable[[], Any], stop_requested: Callable[[], int | None],
          on_item: Callable[[int, int], None] | None = None) -> ServeStats:
    """Compute and send every micro-batch of ``work`` to its student rank, in the order they consume them.

    ``stop_requested()`` returns the step the students stopped after (``None`` while they run);
    then the rest is skipped. Every served student gets an end message last. A failure here is sent
    to them as an error message before it is raised, so they name it instead of timing out.
    """
    stats = ServeStats()
    try:
        for step, student, micro, index, request in work.items():
            stopped = stop_requested()
            if stopped is not None:
                stats.stopped_at = stopped
                break
            if on_item is not None:
                on_item(step, micro)
            began = time.perf_counter()
            batch = {k: v.to(channels[student].device) for k, v in batch_at(index).items()}
            forward = TapRequest(hidden=request.hidden, attention=request.attention,
                                 logits=request.logits or request.sparse_logits)
            with torch.no_grad(), autocast():
                view = forward_with_taps(model, batch, forward)
                meta, tensors = encode_view(view, batch, request, top_k, temperature_at(step))
            meta.update(step=step, micro=micro, request=request_to_json(request), shape=list(batch["input_ids"].shape),
                        examples=batch["example_index"].tolist())
            sent = time.perf_counter()
            stats.compute_s += sent - began
            send_message(channels[student], VIEW, meta, tensors)
            stats.send_s += time.perf_counter() - sent
            stats.sent += 1
            stats.steps = step + 1
            stats.bytes += sum(t.numel() * t.element_size() for t in tensors.values())
    except BaseException as exc:
        message = str(exc) if isinstance(exc, HkdError) else f"{type(exc).__name__}: {exc}"
        for channel in channels.values():
            try:
                send_message(channel, ERROR, {"message": message})
            except Exception:  # the student may be gone too; the error is raised here anyway
                pass
        raise
    for channel in channels.values():
        send_message(channel, END, {"step": stats.stopped_at if stats.stopped_at is not None else work.total_steps})
    return stats
