"""``hkd init-config``: starter configs chosen from two model configs load and train."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hkd.config import load_config
from hkd.errors import HkdError
from hkd.commands.init_config import read_shape, relation_heads, starter_config, write_starter_config
from hkd.train.loop import distill
from hkd.models.loading import write_preset

SHORT_RUN = ["--data.num_examples=8", "--data.batch_size=2", "--data.max_length=32",
             "--train.progress=false", "--schedule.ramp_steps=0", "--optim.warmup_steps=0"]


def fake_model(path: Path, **fields) -> Path:
    """A model directory holding only config.json (init-config reads nothing else)."""
    path.mkdir(parents=True)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 4,
              "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100} | fields
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_cli_writes_a_config_that_loads_and_trains(model_dirs, tmp_path):
    out = tmp_path / "project" / "distill.yaml"
    done = subprocess.run([sys.executable, "-m", "hkd.cli", "init-config", "--teacher", str(model_dirs["teacher"]),
                           "--student", str(model_dirs["student"]), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "student->teacher: 1->2, 2->4" in text and "Widths differ (student 32 -> teacher 64)" in text
    assert not Path(yaml.safe_load(text)["teacher"]["path"]).is_absolute()  # relative to the file
    config = load_config(out, SHORT_RUN)
    assert Path(config.teacher.path).resolve() == model_dirs["teacher"].resolve()
    assert [p.name for p in config.schedule.phases] == ["structure", "feature", "decision"]
    # 4 vs 2 heads with GQA: MiniLMv2 relations, 2 relation heads divide every q/k/v width (128, 64, 64, 32)
    assert config.stages["attention"] == {"mode": "relations", "relation_heads": 2, "log_layers": False}
    assert config.stages["logits"]["fused"] is False  # a 100-token vocabulary
    for phase in config.schedule.phases:
        phase.steps = 1
    result = distill(config, tmp_path / "run")
    assert result.steps == 3 and (result.final_dir / "model.safetensors").is_file()


def test_equal_heads_and_widths_use_per_head_maps_and_no_projector(model_dirs, tmp_path):
    text = starter_config(model_dirs["teacher"], model_dirs["teacher"], tmp_path)
    stages = yaml.safe_load(text)["stages"]
    assert stages["attention"] == {"mode": "maps", "heads": "per_head", "log_layers": False}
    assert "Equal widths (64): hidden states are compared directly" in text


def test_an_encoder_pair_gets_no_logits_phase(tmp_path):
    teacher = write_preset("tiny-bert", tmp_path / "bert-teacher", {"num_hidden_layers": 4}, seed=1)
    student = write_preset("tiny-bert", tmp_path / "bert-student", {"num_hidden_layers": 2, "hidden_size": 32,
                                                                    "intermediate_size": 64, "num_attention_heads": 2})
    out = write_starter_config(teacher, student, tmp_path / "bert.yaml")
    config = load_config(out)
    assert config.teacher.encoder and config.student.encoder
    # the encoder default is what bench/quality_encoder.py measured best: uniform hidden states with nmse
    assert [p.name for p in config.schedule.phases] == ["feature"] and "logits" not in config.stages
    assert config.schedule.phases[0].stages == {"hidden": 1.0} and config.stages["hidden"]["loss"] == "nmse"
    # the embedding pair costs a random encoder student its neighbours (README, "A random student")
    assert config.stages["hidden"]["include_embeddings"] is False


def test_big_vocabularies_get_the_fused_loss_and_relation_heads_divide_real_widths(tmp_path):
    # a Llama-3-8B-like teacher (32 heads x 128, 8 kv) and a 12-head x 64 student (4 kv): widths 4096/1024/768/256
    teacher = fake_model(tmp_path / "t", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256)
    student = fake_model(tmp_path / "s", num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                         num_key_value_heads=4, vocab_size=128256)
    # not capped at the student's 12 heads (MiniLMv2): 32 relation heads of 8 divide the smallest width, 256
    assert relation_heads(read_shape(teacher, "teacher"), read_shape(student, "student")) == 32
    config = yaml.safe_load(starter_config(teacher, student, tmp_path))
    assert config["stages"]["logits"]["fused"] is True and config["stages"]["attention"]["relation_heads"] == 32


@pytest.mark.parametrize("student_fields, message", [
    ({"vocab_size": 101}, "vocabulary sizes differ (teacher 100, student 101)"),
    ({"model_type": "bert", "architectures": ["BertModel"]}, "one model is an encoder and the other a causal LM"),
    ({"hidden_size": None}, "cannot read the model shape"),
])
def test_incompatible_or_broken_pairs_are_named(tmp_path, student_fields, message):
    teacher = fake_model(tmp_path / "t")
    student = fake_model(tmp_path / "s", **student_fields)
    with pytest.raises(HkdError, match=message.replace("(", r"\(").replace(")", r"\)")):
        starter_config(teacher, student, tmp_path)


def test_cli_errors_are_one_line_and_existing_files_are_kept(tmp_path):
    teacher = fake_model(tmp_path / "t")
    (tmp_path / "empty").mkdir()
    taken = tmp_path / "taken.yaml"
    taken.write_text("mine\n")

    def run(student: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hkd.cli", "init-config", "--teacher", str(teacher),
                               "--student", str(student), *extra], capture_output=True, text=True)

    missing = run(tmp_path / "empty")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "has no config.json" in missing.stderr
    refused = run(teacher, "--out", str(taken))
    assert refused.returncode == 2 and "already exists" in refused.stderr and taken.read_text() == "mine\n"
    printed = run(teacher)
    assert printed.returncode == 0 and yaml.safe_load(printed.stdout)["teacher"]["path"]
