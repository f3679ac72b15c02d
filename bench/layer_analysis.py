"""Why do more layers not help a random student? Cheap diagnostics at initialisation (no training).

    python bench/layer_analysis.py --seeds 0 1 2

Teacher all-MiniLM-L6-v2 (bench/quality_encoder.py), student the benchmark's random 3x192 BERT,
the hidden stage of ``hkd/plugins/hidden.py`` itself with the benchmark's uniform layer map
(0->0, 1->2, 2->4, 3->6). On one batch of training sentences it reports, per teacher layer:

* ``sq_norm``: mean squared hidden norm per token, and ``mean_share``: the share of it that is
  one vector shared by every token (the layer's mean token). A student that predicts that
  vector (a projector can learn it from any constant feature) already removes this share of
  the MSE; only the rest carries the sentence, and only the rest moves the metric.
* per mapped pair: its loss (mse and nmse) and the gradient norm it sends to each student
  part (embeddings, blocks 1-3, its projector); the cosine between each pair's gradient and the
  last pair's on the parts they share (does aligning intermediate layers pull the lower
  blocks the way the last-layer target wants?).

Under AdamW a constant factor on one parameter's gradient cancels, so the 1/4 that the mean
over four pairs puts on the last block's gradient is no handicap by itself; what can hurt is
the direction the intermediate pairs add to the shared lower blocks. The JSON goes to
``bench/results/layer-analysis/layer-analysis-DATE.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_encoder import MAX_LENGTH, WORK, corpus, teacher_dir, write_student  # noqa: E402

from hkd import ModelView, StageContext, StepState  # noqa: E402
from hkd.models.layermap import LayerMapConfig  # noqa: E402
from hkd.plugins.hidden import HiddenStage, HiddenStageConfig  # noqa: E402



def parts(student: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """Student parameters by part: embeddings, block 1..L (1-based, as layer maps count)."""
    out: dict[str, list[torch.nn.Parameter]] = {"embeddings": list(student.embeddings.parameters())}
    for index, block in enumerate(student.encoder.layer):
        out[f"block{index + 1}"] = list(block.parameters())
    return out


def flat_grad(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def analyse(seed: int, teacher_path: Path, sentences: list[str]) -> dict[str, Any]:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    teacher = AutoModel.from_pretrained(teacher_path).eval()
    student = AutoModel.from_pretrained(write_student(teacher_path, WORK / f"student-seed{seed}", seed)).train()
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    mask = batch["attention_mask"]
    with torch.no_grad():
        t_hidden = teacher(**batch, output_hidden_states=True).hidden_states
    s_hidden = student(**batch, output_hidden_states=True).hidden_states
    real = mask.bool()

    layers = []
    for h in t_hidden:
        tokens = h[real].double()
        sq = tokens.pow(2).sum(-1).mean().item()
        mean_sq = tokens.mean(0).pow(2).sum().item()
        layers.append({"sq_norm": sq, "mean_share": mean_sq / sq})

    feed = {"loss_mask": mask, "attention_mask": mask}
    state = StepState(step=0, temperature=1.0, tokens=int(mask.sum()))
    student_parts = parts(student)
    out: dict[str, Any] = {"seed": seed, "teacher_layers": layers, "losses": {}}
    for loss_name in ("mse", "nmse"):
        torch.manual_seed(seed)  # the same projector initialisation for both losses
        config = HiddenStageConfig(loss=loss_name, include_embeddings=True,  # type: ignore[arg-type]
                                   layer_map=LayerMapConfig(strategy="uniform"))
        stage = HiddenStage(config, StageContext("hidden", teacher, student, {}, "stages.hidden"))
        pairs = list(stage.layer_map)
        per_pair: dict[str, Any] = {}
        grads: dict[str, dict[str, torch.Tensor]] = {}
        for s, t in pairs:
            stage.layer_map = [(s, t)]  # the plugin's own loss, one pair at a time (times 1/len: its share of the mean)
            loss = stage.loss(feed, ModelView(hidden_states=t_hidden), ModelView(hidden_states=s_hidden), state)["hidden"]
            share = loss / len(pairs)
            grads[f"{s}_{t}"] = {name: flat_grad(share, params) for name, params in student_parts.items()}
            projector = list(stage.projectors[f"{s}_{t}"].parameters())
            per_pair[f"{s}_{t}"] = {
                "loss": loss.item(),
                "grad_norm": {name: g.norm().item() for name, g in grads[f"{s}_{t}"].items()}
                | {"projector": flat_grad(share, projector).norm().item()},
            }
        last = f"{pairs[-1][0]}_{pairs[-1][1]}"
        for key, by_part in grads.items():
            per_pair[key]["cosine_with_last"] = {
                name: torch.nn.functional.cosine_similarity(g, grads[last][name], dim=0).item()
                for name, g in by_part.items() if g.norm() > 0 and grads[last][name].norm() > 0 and key != last}
        lower = [name for name in student_parts if name != f"block{pairs[-1][0]}"]
        others = {name: sum(grads[k][name] for k in grads if k != last) for name in lower}
        per_pair["intermediate_sum_vs_last"] = {
            name: {"cosine": torch.nn.functional.cosine_similarity(others[name], grads[last][name], dim=0).item(),
                   "norm_ratio": (others[name].norm() / grads[last][name].norm().clamp_min(1e-30)).item()}
            for name in lower}
        out["losses"][loss_name] = per_pair
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sentences", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    teacher = teacher_dir()
    WORK.mkdir(parents=True, exist_ok=True)
    train, _, digest = corpus()
    results = [analyse(seed, teacher, train[:args.sentences]) for seed in args.seeds]
    for result in results:
        print(f"seed {result['seed']}: teacher mean-token share per layer",
              [round(x["mean_share"], 2) for x in result["teacher_layers"]])
        for loss_name, per_pair in result["losses"].items():
            for key, row in per_pair.items():
                print(f"  {loss_name:5s} {key:24s}", json.dumps(row, default=lambda v: round(v, 4))
                      if key == "intermediate_sum_vs_last" else
                      f"loss {row['loss']:.4f} grad " + " ".join(f"{k} {v:.2e}" for k, v in row["grad_norm"].items())
                      + " cos(last) " + " ".join(f"{k} {v:+.2f}" for k, v in row.get("cosine_with_last", {}).items()))
    from provenance import default_path, header

    path = default_path("layer-analysis")
    path.write_text(json.dumps({
        **header("layer_analysis.py", None), "benchmark": "layer_analysis",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "corpus_sha256": digest, "sentences": args.sentences, "max_length": MAX_LENGTH,
        "summary_mean_share": [statistics.fmean(r["teacher_layers"][i]["mean_share"] for r in results)
                               for i in range(len(results[0]["teacher_layers"]))],
        "seeds": results}, indent=1, default=float) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
