"""Per-layer CKA of finished encoder-benchmark students with the teacher (``hkd probe --final``).

    python bench/encoder_cka.py                                  # every finished run under runs/bench-encoder
    python bench/encoder_cka.py --runs 'runs/bench-encoder/*-60-teacher*' --batches 4

For each run directory of ``bench/quality_encoder.py`` that still has its ``final/`` model,
runs :func:`hkd.commands.probe.probe` with ``final=True`` (linear CKA between every teacher and every
student layer on the run's own training batches) and reports, per arm (the run name's first
part) and student initialisation, over its seeds:

* ``cka_last``: CKA(student's last layer, teacher's last layer), what the pooled embedding sees;
* ``cka_uniform``: the mean CKA over the uniform map's pairs (student block ``s`` with teacher
  block ``round(s * L_t / L_s)``), how far each student layer resembles "its" teacher layer;
* ``cka_by_student_layer``: for each student layer, its CKA with the teacher layer the uniform
  map assigns.

Results go to ``bench/results/encoder-cka/encoder-cka-DATE.json``.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import default_path  # noqa: E402
from quality import run_header, summary as stats  # noqa: E402

from hkd.commands.probe import probe  # noqa: E402

NAME = re.compile(r"(?P<arm>.+?)-seed(?P<seed>\d+)-(?P<steps>\d+)-(?P<init>random|teacher)(?P<tag>.*)")


def uniform_pairs(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    return [(s, round(s * teacher_layers / student_layers)) for s in range(1, student_layers + 1)]


def layer_scores(result: dict[str, Any]) -> dict[str, Any]:
    cka = result["hidden_cka"]  # rows: teacher layers 0..T, columns: student layers 0..S
    t_layers, s_layers = result["teacher_layers"], result["student_layers"]
    pairs = uniform_pairs(s_layers, t_layers)
    by_layer = [cka[t][s] for s, t in pairs]
    return {"cka_last": cka[t_layers][s_layers], "cka_uniform": statistics.fmean(by_layer),
            "cka_by_student_layer": by_layer}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["runs/bench-encoder/*"], help="run directory globs")
    parser.add_argument("--batches", type=int, default=2, help="micro-batches per probe")
    parser.add_argument("--out", help="JSON path (default bench/results/encoder-cka/encoder-cka-DATE.json)")
    args = parser.parse_args(argv)
    runs = sorted({Path(p) for pattern in args.runs for p in glob.glob(pattern)
                   if (Path(p) / "final" / "config.json").is_file() and (Path(p) / "config.yaml").is_file()})
    if not runs:
        parser.error(f"no finished run directory (with final/ and config.yaml) matches {args.runs}")
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        match = NAME.fullmatch(run.name)
        if match is None:
            print(f"skipped {run} (not a quality_encoder run name)", file=sys.stderr)
            continue
        result = json.loads(probe(run, batches=args.batches, progress=False, final=True).read_text())
        # grouped by arm, init and steps: a tag only names the invocation that ran the seed
        key = f"{match['arm']} ({match['init']} init, {match['steps']} steps)"
        entry = {"seed": int(match["seed"]), "run": str(run), "tag": match["tag"], "tokens": result["tokens"],
                 **layer_scores(result)}
        groups.setdefault(key, []).append(entry)
        print(f"{key:45s} seed {entry['seed']}: last {entry['cka_last']:.3f}  uniform {entry['cka_uniform']:.3f}  "
              f"by layer {[round(x, 3) for x in entry['cka_by_student_layer']]}", flush=True)
    summary: dict[str, Any] = {}
    for key, entries in groups.items():
        summary[key] = {"seeds": [e["seed"] for e in entries], "runs": entries,
                        "cka_last": stats([e["cka_last"] for e in entries]),
                        "cka_uniform": stats([e["cka_uniform"] for e in entries])}
    out = Path(args.out) if args.out else default_path("encoder-cka")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**run_header("encoder_cka.py", argv), "batches": args.batches, "arms": summary},
                              indent=1) + "\n")
    print(f"\n{'arm':45s} {'seeds':>5s} {'CKA last':>14s} {'CKA uniform':>14s}")
    for key, entry in sorted(summary.items()):
        last, uni = entry["cka_last"], entry["cka_uniform"]
        print(f"{key:45s} {len(entry['seeds']):5d} {last['mean']:.3f} ± {last['std']:.3f} "
              f"{uni['mean']:.3f} ± {uni['std']:.3f}")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
