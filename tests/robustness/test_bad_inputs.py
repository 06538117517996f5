"""Bad inputs through ``ftframe fit``: each stops with exit code 2 and a message naming the file and line (or the
option) and a fix, and leaves no output behind -- no adapter, no checkpoint, no half-written folder."""

from __future__ import annotations

import json

import pytest

from ftframe.cli import main
from tests.helpers import checkpointing_trainer, tiny_fit_args, tiny_instruction_data

GOOD = {"instruction": "What is one plus one?", "output": "two"}


def _jsonl(records: list) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


#: (id, file name, file bytes or None for no file, extra options, the message expected on stderr)
CASES = [
    ("malformed-json", "d.jsonl", _jsonl([GOOD, '{"instruction": "a", "output": }']), [],
     r"d.jsonl:2: invalid JSON at column \d+"),
    ("not-an-object", "d.jsonl", _jsonl([GOOD, '["a", "b"]']), [], r"d.jsonl:2: expected a JSON object per line, got list"),
    ("missing-field", "d.jsonl", _jsonl([GOOD, {"instruction": "a"}]), [],
     r"d.jsonl:2: field 'output' is missing \(record has \['instruction'\]\)\. Add it, or map your column"),
    ("wrong-type", "d.jsonl", _jsonl([GOOD, {"instruction": "a", "output": 5}]), [],
     r"d.jsonl:2: field 'output' must be a string, got int 5"),
    ("empty-file", "d.jsonl", b"", [], r"data file .*d.jsonl is empty"),
    ("non-utf8", "d.jsonl", _jsonl([GOOD]) + b'{"instruction": "caf\xe9", "output": "x"}\n', [],
     r"d.jsonl: bytes at offset \d+ are not valid UTF-8 .*re-save the file as UTF-8"),
    ("missing-file", None, None, [], r"data file .*nothere.jsonl' does not exist; check the path in train_files"),
    ("unsupported-extension", "d.txt", b"hello\n", [], r"data file .*d.txt' has an unsupported extension"),
    ("csv-extra-cells", "d.csv", b"instruction,output\na,b,c\n", [],
     r"d.csv:2: row has more cells than the 2 header columns; quote cells containing commas"),
    ("csv-unclosed-quote", "d.csv", b'instruction,output\n"a, b\nc,d\n', [],
     r"d.csv:3: row has 1 cell\(s\), the header 2 \(no \['output'\]\); an unclosed quote \(\"\) may have joined"),
    ("json-not-records", "d.json", b'{"rows": 3}', [], r"d.json: expected a JSON array of records"),
    ("unknown-data-option", "d.jsonl", _jsonl([GOOD] * 8), ["--data.max_lenght=64"],
     r"--data.max_lenght: InstructionDataModule has no option 'max_lenght'; did you mean max_length\?"),
    ("unknown-trainer-option", "d.jsonl", _jsonl([GOOD] * 8), ["--trainer.max_step=3"],
     r"--trainer.max_step: Trainer has no option 'max_step'; did you mean max_steps"),
    ("unknown-method", "d.jsonl", _jsonl([GOOD] * 8), ["--model=LoRB"],
     r"--model 'LoRB' is not a FineTuneModule subclass\. ftframe's: \["),
    ("bad-batch-size", "d.jsonl", _jsonl([GOOD] * 8), ["--data.batch_size=0"], r"batch_size must be >= 1, got 0"),
    ("bad-learning-rate", "d.jsonl", _jsonl([GOOD] * 8), ["--model.optimizer.learning_rate=0"], r"learning_rate must be > 0"),
    ("missing-model", "d.jsonl", _jsonl([GOOD] * 8), ["--model.model_name=no/such/dir/model"],
     r"model path 'no/such/dir/model' does not exist"),
    ("fsdp-on-cpu", "d.jsonl", _jsonl([GOOD] * 8), ["--trainer.strategy=fsdp"],
     r"strategy 'fsdp' needs CUDA GPUs.*configs/strategy/ddp.yaml"),
    ("lora-rank-zero", "d.jsonl", _jsonl([GOOD] * 8), ["--model.r=0"], r"r \(LoRA rank\) must be >= 1, got 0"),
    ("chat-messages-not-a-list", "d.jsonl", _jsonl([{"messages": "hi"}]), [],
     r"d.jsonl:1: field 'messages' must be a non-empty list of \{role, content\} objects, got 'hi'"),
    ("chat-unknown-role", "d.jsonl", _jsonl([{"messages": [{"role": "wizard", "content": "x"},
                                                           {"role": "assistant", "content": "y"}]}]), [],
     r"d.jsonl:1: field 'messages\[0\].role' is 'wizard'; use one of \['system', 'user', 'assistant'\]"),
    ("chat-no-assistant", "d.jsonl", _jsonl([{"messages": [{"role": "user", "content": "x"}]}]), [],
     r"d.jsonl:1: field 'messages' has no assistant message, so nothing would be learned from it"),
    ("unknown-format", "d.jsonl", _jsonl([{"question": "a", "answer": "b"}]), [],
     r"d.jsonl:1: cannot tell the record format from its fields \['answer', 'question'\]"),
    ("option-wrong-type", "d.jsonl", _jsonl([GOOD] * 8), ["--data.batch_size=abc"],
     r"--data.batch_size=abc: expected a whole number"),
    ("bool-option-wrong-value", "d.jsonl", _jsonl([GOOD] * 8), ["--data.packing=maybe"],
     r"--data.packing=maybe: expected true or false"),
    ("all-records-held-out", "d.jsonl", _jsonl([GOOD] * 8), ["--data.val_size=100"],
     r"val_size=100.0 leaves no training records out of 8"),
    ("missing-checkpoint", "d.jsonl", _jsonl([GOOD] * 8), ["--ckpt_path=no/such/checkpoint"],
     r"--ckpt_path no/such/checkpoint does not exist\. Checkpoints are folders like"),
    ("cli-strict", "d.jsonl", _jsonl([GOOD] * 7 + [{"instruction": "a", "output": "b c " * 200}]),
     ["--strict", "--data.max_length=32"], r"strict: 1 train record\(s\) of .* would be truncated or dropped"),
    ("strict-truncation", "d.jsonl", _jsonl([GOOD] * 7 + [{"instruction": "a", "output": "b c " * 200}]),
     ["--data.strict=true", "--data.max_length=32"], r"strict: 1 train record\(s\) of .* would be truncated"),
]


@pytest.mark.parametrize(("name", "filename", "content", "extra", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_stops_with_a_clear_message_and_leaves_no_output(name, filename, content, extra, message, tiny_model,
                                                                   tmp_path, capsys):
    data = tmp_path / (filename or "nothere.jsonl")
    if content is not None:
        data.write_bytes(content)
    run = tmp_path / "run"
    args = ["fit", f"--model.model_name={tiny_model}", f"--data.train_files={data}", "--data.val_size=2",
            f"--data.cache_dir={tmp_path / 'cache'}", "--trainer.max_steps=2", "--trainer.accelerator=cpu",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={run}",
            f"--adapter.dirpath={run / 'adapter'}", "--trainer.callbacks+=ftframe.callbacks.AdapterCheckpoint",
            "--trainer.callbacks.every_n_train_steps=1", *extra]
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    import re

    assert re.search(message, err), err[-2000:]
    assert "Traceback" not in err
    left = sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) if run.exists() else []
    assert not [p for p in left if p != "config.yaml"], left  # (LightningCLI's copy of the configuration aside)


def test_a_misspelt_option_in_a_yaml_file_is_named_with_its_file_line_and_a_suggestion(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  class_path: ftframe.methods.DoRA\n  init_args:\n    r: 8\n    dropuot: 0.1\n"
                      "data:\n  init_args:\n    max_lenght: 64\n", encoding="utf-8")
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config)])
    assert stop.value.code == 2
    assert f"{config}:5: model.dropuot: DoRA has no option 'dropuot'; did you mean dropout?" in capsys.readouterr().err
    config.write_text("data:\n  init_args:\n    max_lenght: 64\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config)])
    assert (f"{config}:3: data.max_lenght: InstructionDataModule has no option 'max_lenght'; did you mean max_length?"
            in capsys.readouterr().err)


def test_an_output_folder_that_cannot_be_created_is_refused_before_training(tiny_model, tiny_data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as stop:
        main(tiny_fit_args(tiny_model, tiny_data, tmp_path / "run", blocker / "adapter"))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"output folder {blocker / 'adapter'} cannot be created: {blocker} is a file, not a folder; choose " \
           "another with --adapter.dirpath" in err, err[-2000:]
    assert "Traceback" not in err


def test_a_full_disk_while_checkpointing_removes_the_partial_folder_and_names_the_intact_one(tiny_model, tiny_data,
                                                                                            tmp_path, monkeypatch):
    import errno

    from ftframe import artifacts
    from ftframe.errors import UserError
    from ftframe.methods import LoRA

    original = artifacts.write_trained
    calls = []

    def fill_the_disk(trainer, *args, **kwargs):
        calls.append(trainer.global_step)
        if trainer.global_step == 2:
            (args[1] / "adapter_model.safetensors").parent.mkdir(parents=True, exist_ok=True)
            (args[1] / "adapter_model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(trainer, *args, **kwargs)

    import ftframe.callbacks.adapter_checkpoint as checkpoint_module

    monkeypatch.setattr(checkpoint_module, "write_trained", fill_the_disk)
    folder = tmp_path / "checkpoints"
    data = tiny_instruction_data(tiny_model, tiny_data, tmp_path)
    trainer = checkpointing_trainer(tmp_path, folder, max_steps=4, every_n_train_steps=1)
    with pytest.raises(UserError, match=rf"no space left on the device while writing {folder / 'step=000002'} "
                                        rf"\(\d+ MiB free\): the partial folder was removed and the last complete "
                                        rf"checkpoint, {folder / 'step=000001'}, is intact"):
        trainer.fit(LoRA(model_name=tiny_model), datamodule=data)
    assert sorted(p.name for p in folder.iterdir()) == ["last", "step=000001"]  # no .tmp-step=000002 left
    assert (folder / "last").resolve().name == "step=000001"
    assert (folder / "step=000001" / "adapter_model.safetensors").is_file()


def test_a_missing_optional_package_is_named_with_its_install_command(tmp_path, monkeypatch):
    import builtins

    from ftframe.data.readers import read_records
    from ftframe.errors import UserError

    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(UserError, match=r"reading Parquet needs pyarrow: pip install pyarrow"):
        list(read_records(str(path)))
