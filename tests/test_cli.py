"""The ftframe command: errors as one paragraph, links, help, generate, and every shipped YAML."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ftframe.cli import FTFrameCLI, main
from ftframe.errors import UserError
from tests.helpers import tiny_fit_args

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "ftframe", *args], capture_output=True, text=True, cwd=ROOT, **kw)


#: strategies Lightning runs on CUDA GPUs only: on this CPU machine their YAMLs must fail with the way out
GPU_ONLY = {"fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "ddp_2nodes.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_every_config_parses_and_instantiates(path, tiny_model):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ftframe "), f"{path} must open with the command that runs it"
    if path.parent.name == "eval":  # an evaluation gate (ftframe merge/export --eval), not a training config
        from ftframe.tools.gate import EvalGate

        gate = EvalGate.from_file(path)
        assert gate.evaluations and f"--eval configs/eval/{path.name}" in first
        return
    if path.parent.name == "prompts":  # a prompt format (ftframe evaluate --prompt_format), not a training config
        from ftframe.evaluation import load_prompt_format

        assert load_prompt_format(path).question and f"--prompt_format configs/prompts/{path.name}" in first
        return
    if path.name.endswith("_space.yaml"):  # an ftframe tune search space, checked against the run it names
        from ftframe.tune import _parse_run, check_space, load_space

        assert f"--space configs/tune/{path.name}" in first
        run = [a for a in re.findall(r"--config (\S+)", first)]
        run_args = [x for c in run for x in ("--config", str(ROOT / c))] + [f"--model.init_args.model_name={tiny_model}"]
        params = load_space(path)
        _, config = _parse_run(run_args)
        check_space(params, run_args, config)
        assert params
        return
    args = ["--config", str(path), f"--model.init_args.model_name={tiny_model}"]
    if path.parent.name == "strategy" and path.name in GPU_ONLY and not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"configs/strategy/ddp\.yaml"):
            FTFrameCLI(args=args, run=False)
        return
    cli = FTFrameCLI(args=args, run=False)
    assert cli.datamodule.tokenizer_name == tiny_model  # the link: data tokenizer follows the model


class _ParseOnly(FTFrameCLI):
    def instantiate_classes(self) -> None:  # parse and validate the YAMLs, build nothing (no GPU needed)
        pass


STRATEGIES = sorted((ROOT / "configs" / "strategy").glob("*.yaml"))
METHOD_CONFIGS = sorted((ROOT / "configs" / "methods").glob("*.yaml"))


@pytest.mark.parametrize("strategy", STRATEGIES, ids=[p.stem for p in STRATEGIES])
def test_every_strategy_parses_with_every_method(strategy):
    for method in METHOD_CONFIGS:
        cli = _ParseOnly(args=["--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", str(method),
                               "--config", str(strategy)], run=False)
        chosen = cli.config["trainer"]["strategy"]
        assert chosen == "ddp" or chosen["class_path"].endswith(("FSDPStrategy", "DeepSpeedStrategy")), method
        assert cli.config["model"]["class_path"] == yaml.safe_load(method.read_text())["model"]["class_path"]


def test_fsdp_policies_wrap_blocks_and_modules_that_train_alone(tiny_model):
    from ftframe.distributed import decoder_block_policy, fsdp_auto_wrap_policy
    from ftframe.methods import LoRA

    module = LoRA(model_name=tiny_model, r=2)
    module.configure_model()
    wrapped = {name for name, m in module.model.named_modules() if name and fsdp_auto_wrap_policy(m, False, 0)}
    blocks = {name for name, m in module.model.named_modules() if type(m).__name__ == "LlamaDecoderLayer"}
    assert blocks and blocks <= wrapped
    for name in wrapped - blocks:  # the rest: LoRA factors, each holding trainable weights only
        params = list(dict(module.model.named_modules())[name].parameters(recurse=False))
        assert params and all(p.requires_grad for p in params) and ("lora_A" in name or "lora_B" in name), name
    assert any("lora_A" in n for n in wrapped) and not any(n.endswith("q_proj.base_layer") for n in wrapped)
    checkpointed = {name for name, m in module.model.named_modules() if name and decoder_block_policy(m, False, 0)}
    assert checkpointed == blocks


def test_model_name_is_linked_to_tokenizer(tiny_model):
    cli = FTFrameCLI(args=[f"--model.model_name={tiny_model}"], run=False)
    assert cli.model.model_name == cli.datamodule.tokenizer_name == tiny_model


def test_help_documents_every_knob():
    out = _run(["fit", "--help"]).stdout
    for knob in ["--model CONFIG", "--data CONFIG", "--adapter.dirpath", "--validate_before_fit", "--trainer.max_steps"]:
        assert knob in out, knob
    out = _run(["fit", "--model.help", "ftframe.methods.LoRA"]).stdout
    for knob in ["--model.r", "--model.alpha", "--model.target_modules", "--model.optimizer.learning_rate",
                 "--model.optimizer.lr_schedule", "Rank of the update matrices"]:
        assert knob in out, knob
    out = _run(["fit", "--data.help", "ftframe.data.InstructionDataModule"]).stdout
    for knob in ["--data.train_files", "--data.max_length", "--data.truncation", "--data.template"]:
        assert knob in out, knob
    gen = _run(["generate", "--help"]).stdout
    for knob in ["--adapter", "--prompt", "--max_new_tokens", "--temperature", "Folder written by"]:
        assert knob in gen, knob
    assert "--names" in _run(["download", "--help"]).stdout


def test_unknown_method_is_rejected_with_a_clear_message():
    res = _run(["fit", "--model", "ftframe.methods.NoSuchMethod", "--print_config"])
    assert res.returncode == 2
    assert "--model 'ftframe.methods.NoSuchMethod' is not a FineTuneModule subclass" in res.stderr
    from ftframe.methods import METHODS

    assert str(sorted(METHODS)) in res.stderr and "Traceback" not in res.stderr  # every method, from the registry


def test_a_users_own_method_works_by_import_path(tiny_model, tiny_data, tmp_path):
    """docs/design.md: --model my_pkg.MyMethod works with no ftframe change."""
    out = tmp_path / "out"
    main(["fit", "--model=tests.custom_method.NormOnly", f"--model.model_name={tiny_model}",
          "--model.include_final_norm=false", f"--data.train_files={tiny_data}", f"--data.cache_dir={tmp_path}",
          "--data.val_size=8", "--trainer.fast_dev_run=true", "--trainer.accelerator=cpu",
          f"--trainer.default_root_dir={tmp_path}", f"--adapter.dirpath={out}"])
    meta = __import__("json").loads((out / "ftframe.json").read_text())
    assert meta["method"] == "tests.custom_method.NormOnly"
    assert (out / "model.safetensors").is_file()


def test_user_errors_are_one_paragraph_without_traceback(tmp_path):
    res = _run(["fit", "--model.model_name=./no/such/model", "--trainer.fast_dev_run=true",
                f"--trainer.default_root_dir={tmp_path}"])
    assert res.returncode == 2
    assert "ftframe: error: model path './no/such/model' does not exist" in res.stderr
    assert "Traceback" not in res.stderr


def test_debug_flag_shows_traceback(tmp_path):
    res = _run(["fit", "--debug", "--model.model_name=./no/such/model", "--trainer.fast_dev_run=true",
                f"--trainer.default_root_dir={tmp_path}"])
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_unknown_target_module_lists_valid_ones(tiny_model, tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", f"--model.model_name={tiny_model}", "--model.target_modules=[qkv]",
              f"--data.train_files={tiny_data}", f"--data.cache_dir={tmp_path}", "--trainer.fast_dev_run=true",
              f"--trainer.default_root_dir={tmp_path}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "target_modules ['qkv'] not found" in err and "q_proj" in err and "down_proj" in err


def test_qlora_without_bitsandbytes(tiny_model, monkeypatch):
    import builtins

    from ftframe.errors import UserError
    from ftframe.methods import QLoRA

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(UserError, match=r"QLoRA needs bitsandbytes: pip install"):
        QLoRA(model_name=tiny_model).configure_model()


def test_generate_with_saved_adapter(tiny_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "adapter"
    main(tiny_fit_args(tiny_model, tiny_data, tmp_path, out))
    capsys.readouterr()
    main(["generate", f"--adapter={out}", "--prompt=What is one plus two?", "--max_new_tokens=5"])
    printed = capsys.readouterr().out
    assert printed.startswith(">>> What is one plus two?\n")
    from ftframe.tools.generate import Generator

    gen = Generator(adapter=str(out))  # base model read from adapter_config.json
    answer = gen(["What is one plus two?"], max_new_tokens=5)[0]
    assert answer in printed


def test_predict_generates_answers_for_held_out_prompts(tiny_model, tiny_data, tmp_path):
    cli = FTFrameCLI(args=[f"--model.model_name={tiny_model}", "--model.task=ftframe.tasks.CausalLM",
                           "--model.task.max_new_tokens=4", f"--data.train_files={tiny_data}",
                           f"--data.cache_dir={tmp_path}", "--data.val_size=5", "--data.eval_batch_size=2",
                           "--trainer.accelerator=cpu", "--trainer.logger=false",
                           f"--trainer.default_root_dir={tmp_path}"], run=False)
    batches = cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    results = [r for b in batches for r in b]
    assert len(results) == 5
    first = results[0]
    assert first["prompt"].endswith("<|im_start|>assistant\n") and "plus" in first["prompt"]
    assert " is " in first["reference"] and "####" in first["reference"]
    assert isinstance(first["prediction"], str)


def test_validate_exports_the_adapter_of_a_checkpoint_on_demand(tiny_model, tiny_data, tmp_path):
    from safetensors.torch import load_file

    common = [f"--model.model_name={tiny_model}", "--model.r=4", f"--data.train_files={tiny_data}",
              f"--data.cache_dir={tmp_path / 'c'}", "--data.val_size=8", "--trainer.accelerator=cpu",
              "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]
    main(["fit", *common, "--trainer.max_steps=3", f"--adapter.dirpath={tmp_path / 'end'}",
          "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
          f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}", "--trainer.callbacks.every_n_train_steps=1",
          "--trainer.callbacks.save_top_k=-1", "--trainer.enable_checkpointing=true"])
    ckpt = next((tmp_path / "ckpt").glob("*step=2.ckpt"))
    main(["validate", *common, f"--ckpt_path={ckpt}", "--adapter.save_on_validate=true",
          f"--adapter.dirpath={tmp_path / 'step2'}"])
    at_step2 = load_file(str(tmp_path / "step2" / "adapter_model.safetensors"))
    at_end = load_file(str(tmp_path / "end" / "adapter_model.safetensors"))
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    key = next(k for k in at_step2 if "lora_A" in k)
    ckpt_key = next(k for k in state if k.endswith(key.replace(".weight", ".default.weight").split("base_model.model.", 1)[1]))
    assert torch.equal(at_step2[key], state[ckpt_key])
    assert not torch.equal(at_step2[key], at_end[key])  # step 2 differs from the final adapter (step 3)


def test_validate_before_fit_with_validation_inside_fit(tiny_model, tiny_data, tmp_path, capsys):
    # the metric state made under trainer.validate's inference mode must not break the sanity check / in-fit validation
    main(tiny_fit_args(tiny_model, tiny_data, tmp_path, tmp_path / "out", "--trainer.num_sanity_val_steps=1",
                       "--trainer.val_check_interval=1", "--validate_before_fit=true"))
    printed = capsys.readouterr().out
    assert re.search(r"val/loss: before \d+\.\d+ -> after \d+\.\d+", printed), printed


def test_a_tools_list_options_take_space_separated_values_typed_by_jsonargparse(capsys):
    from ftframe.cli import _tool

    def tool(names: list[str] | None = None, weights: list[float] | None = None, prompt: str | list[str] | None = None,
             steps: int = 1) -> dict:
        return {"names": names, "weights": weights, "prompt": prompt, "steps": steps}

    run = _tool(tool, "tool")
    assert run(["--names", "a b", "c:d", "--weights", "1", "0.5", "--prompt", "What is 2+2?", "--steps", "3"]) == {
        "names": ["a b", "c:d"], "weights": [1.0, 0.5], "prompt": ["What is 2+2?"], "steps": 3}
    assert run(["--names", "[x, y]", "--weights+", "2", "--weights+", "3", "--prompt=hi"]) == {
        "names": ["x", "y"], "weights": [2.0, 3.0], "prompt": "hi", "steps": 1}
    with pytest.raises(SystemExit) as stop:
        run(["--weights", "1", "x"])  # the element type is jsonargparse's to check
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert 'Parser key "weights"' in err and "Got value: x" in err


@pytest.mark.parametrize(("flag", "message"), [
    ("--data.packing=1", "--data.packing=1: expected true or false"),
    ("--data.max_train_examples=none", "--data.max_train_examples=none: expected a whole number (or null)"),
    ("--model.neftune_alpha=x", "--model.neftune_alpha=x: expected a number (or null)"),
    ("--data.packing=yes", None), ("--data.max_train_examples=null", None), ("--trainer.max_steps=3", None)])
def test_a_flag_value_is_checked_as_jsonargparse_would(flag, message):
    from ftframe.cli import _check_option_names

    if message is None:
        _check_option_names([flag])  # jsonargparse accepts it, so must this
    else:
        with pytest.raises(UserError, match=re.escape(message)):
            _check_option_names([flag])
