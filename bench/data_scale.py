"""Peak memory and start-up time of ``data.kind: hf`` as the data set grows (1k vs 1M examples).

    python bench/data_scale.py                          # sizes 1000,1000000; packing on; 20 steps
    python bench/data_scale.py --sizes 1000,100000 --steps 5 --no-packing
    python bench/data_scale.py --streaming --no-packing   # data.streaming: nothing cached, read on the fly

For each size a JSONL file of short arithmetic examples ({"prompt": "12+34=", "completion":
"46"}) is generated in ``--workdir``. Then, per size, a fresh subprocess runs twice: ``cold``
(no ``.hkd-cache`` next to the data: JSON -> Arrow conversion and tokenisation happen) and
``warm`` (the cache from the cold run is reused). Each run reads the data through
:func:`hkd.data.encoding.encode_dataset` (``kind: hf``), builds :class:`hkd.data.encoding.Batches` (packing as
configured) and trains a tiny Llama student for ``--steps`` optimizer steps on next-token loss
through :func:`hkd.models.taps.forward_with_taps` (the same forward the loop runs), printing the time
to the first step, the step time and the process's peak RSS (``ru_maxrss``). The table goes to
stdout and JSON (command, date, rows) to ``bench/results/data-scale/data-scale-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generate(path: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as out:
        for _ in range(count):
            a, b = rng.randrange(1000), rng.randrange(1000)
            out.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")


def child(args: argparse.Namespace) -> None:
    """One run: read, batch, train; print one JSON line."""
    import torch

    from hkd.config import DataConfig
    from hkd.data.encoding import Batches, encode_dataset
    from hkd.models.loading import build_preset, char_tokenizer
    from hkd.models.taps import TapRequest, forward_with_taps

    torch.set_num_threads(1)
    start = time.perf_counter()
    tokenizer = char_tokenizer()
    config = DataConfig(kind="hf", path=args.data, prompt_field="prompt", max_length=args.max_length,
                        batch_size=args.batch_size, packing=args.packing, num_proc=args.num_proc,
                        streaming=args.streaming)
    encoded = encode_dataset(tokenizer, config, 0)
    batches = Batches(encoded, config, tokenizer.pad_token_id, seed=0)
    ready = time.perf_counter()
    model = build_preset("tiny-llama", {"num_hidden_layers": 2}, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step_times = []
    first_step_at = 0.0
    for step in range(args.steps):
        began = time.perf_counter()
        batch = batches.batch(step)
        view = forward_with_taps(model, batch, TapRequest(logits=True))
        assert view.logits is not None
        mask = batch["loss_mask"][:, :-1]
        losses = torch.nn.functional.cross_entropy(view.logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten(),
                                                   reduction="none")
        loss = (losses * mask.flatten()).sum() / mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_times.append(time.perf_counter() - began)
        if step == 0:
            first_step_at = time.perf_counter() - start
    print(json.dumps({
        "examples": None if args.streaming else len(encoded),
        "rows": None if args.streaming else len(batches.encoded), "read_s": round(ready - start, 2),
        "first_step_s": round(first_step_at, 2), "median_step_s": round(sorted(step_times)[len(step_times) // 2], 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "final_loss": round(float(loss), 4),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,1000000")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--no-packing", dest="packing", action="store_false")
    parser.add_argument("--streaming", action="store_true")
    parser.add_argument("--workdir", default="/tmp/hkd-data-scale")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        folder = Path(args.workdir) / f"n{size}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        data = folder / "data.jsonl"
        generate(data, size)
        for run in ("cold", "warm"):
            command = [sys.executable, __file__, "--child", "--data", str(data), "--steps", str(args.steps),
                       "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                       "--num-proc", str(args.num_proc)] + ([] if args.packing else ["--no-packing"]) + (
                       ["--streaming"] if args.streaming else [])
            began = time.perf_counter()
            result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)})
            if result.returncode:
                raise SystemExit(result.stderr[-3000:])
            row = {"size": size, "run": run, "packing": args.packing, "streaming": args.streaming, "wall_s": round(time.perf_counter() - began, 1),
                   **json.loads(result.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    variant = ("-streaming" if args.streaming else "") + ("" if args.packing else "-unpacked")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from provenance import default_path, header

    out = default_path("data-scale", variant)
    out.write_text(json.dumps({
        **header("data_scale.py", None), "machine": f"{os.cpu_count()} CPUs (shared), torch threads 1", "rows": rows,
    }, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
