"""Every user mistake ends as one clear ``hkd: error:`` line (exit code 2), never a traceback."""

import shutil

import pytest
import yaml

from hkd.cli import main
from hkd.models.loading import write_preset


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err.strip()


@pytest.fixture
def write_config(tmp_path, raw_config):
    def write(mutate=None, text=None):
        raw = raw_config
        if mutate:
            mutate(raw)
        path = tmp_path / "cfg.yaml"
        path.write_text(text if text is not None else yaml.safe_dump(raw))
        return str(path)

    return write


def set_path(*keys, value):
    def mutate(raw):
        node = raw
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return mutate


def jsonl_data(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return set_path("data", value={"kind": "jsonl", "path": str(path), "batch_size": 2})


BAD_INPUTS = {
    "unknown key": (set_path("optim", "learning_rate", value=1), r"optim\.learning_rate: unknown key"),
    "wrong type": (set_path("data", "batch_size", value="eight"), r"data\.batch_size: expected int, got str 'eight'"),
    "negative weight": (set_path("schedule", "phases", 0, "stages", value={"attention": -1}), r"schedule\.phases\[0\]\.stages\.attention: -1\.0 is outside \[0, "),
    "unknown stage": (set_path("schedule", "phases", 0, "stages", value={"atention": 1.0}), r"stage 'atention' is not available"),
    "unknown stage config": (set_path("stages", "logit", value={}), r"stages\.logit: no installed plugin provides this stage"),
    "stage option typo": (set_path("stages", "logits", value={"divergance": "jsd"}), r"stages\.logits\.divergance: unknown key"),
    "layer map out of range": (
        set_path("stages", "hidden", value={"layer_map": {"strategy": "explicit", "pairs": [[1, 9]]}}),
        r"stages\.hidden\.layer_map: teacher layer 9 is out of range 0\.\.4",
    ),
    "missing model dir": (set_path("teacher", value={"path": "/nonexistent/model"}), r"teacher\.path: model directory '/nonexistent/model' does not exist"),
    "unknown preset": (set_path("student", "preset", value="tiny-gpt9"), r"unknown model preset 'tiny-gpt9'"),
    "unknown plugin to disable": (set_path("plugins", value={"disable": ["nope"]}), r"cannot disable unknown plugin"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_config_values(name, write_config, capsys, tmp_path):
    mutate, message = BAD_INPUTS[name]
    code, err = run_cli(capsys, "distill", write_config(mutate), "--out", str(tmp_path / "run"))
    assert code == 2
    assert err.startswith("hkd: error: ") and "\n" not in err and "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_missing_and_unparsable_config_files(capsys, tmp_path, write_config):
    code, err = run_cli(capsys, "distill", str(tmp_path / "nope.yaml"))
    assert code == 2 and "config file" in err and "does not exist" in err
    code, err = run_cli(capsys, "distill", write_config(text="teacher: [unclosed\n"))
    assert code == 2 and "not valid YAML" in err


def test_bad_override_syntax(capsys, write_config):
    code, err = run_cli(capsys, "distill", write_config(), "--optim.lr")
    assert code == 2 and "config overrides look like --optim.lr=3e-4" in err


def test_malformed_and_empty_data_files(capsys, tmp_path, write_config):
    mutate = jsonl_data(tmp_path / "d.jsonl", ['{"text": "1+1=2"}', '{"text": "2+2=4"', '{"text": "3"}'])
    code, err = run_cli(capsys, "distill", write_config(mutate), "--out", str(tmp_path / "r"))
    assert code == 2 and "d.jsonl:2: malformed JSON" in err and "on_bad_line: skip" in err
    mutate = jsonl_data(tmp_path / "e.jsonl", ["", " "])
    code, err = run_cli(capsys, "distill", write_config(mutate), "--out", str(tmp_path / "r"))
    assert code == 2 and "has no usable records" in err
    mutate = jsonl_data(tmp_path / "f.jsonl", ['{"txt": "1+1=2"}'])
    code, err = run_cli(capsys, "distill", write_config(mutate), "--out", str(tmp_path / "r"))
    assert code == 2 and "f.jsonl:1: missing field(s) ['text']" in err


def test_model_directory_problems(capsys, tmp_path, write_config, model_dirs):
    bare = tmp_path / "bare"
    shutil.copytree(model_dirs["student"], bare)
    (bare / "model.safetensors").unlink()
    code, err = run_cli(capsys, "distill", write_config(set_path("student", value={"path": str(bare)})), "--out", str(tmp_path / "r"))
    assert code == 2 and "holds no weights" in err
    other = write_preset("tiny-llama", tmp_path / "big_vocab", {"num_hidden_layers": 1, "vocab_size": 130})
    code, err = run_cli(capsys, "distill", write_config(set_path("student", value={"path": str(other)})), "--out", str(tmp_path / "r2"))
    assert code == 2 and "vocabulary mismatch: teacher has vocab_size 100, student has 130" in err


def test_resume_without_checkpoint(capsys, tmp_path, write_config):
    code, err = run_cli(capsys, "distill", write_config(), "--out", str(tmp_path / "fresh"), "--resume")
    assert code == 2 and "--resume: no checkpoint in" in err


def test_init_model_writes_a_loadable_directory(capsys, tmp_path):
    from transformers import AutoModelForCausalLM

    assert main(["init-model", "tiny-qwen2", "--out", str(tmp_path / "m"), "--num_hidden_layers=3"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").config.num_hidden_layers == 3
