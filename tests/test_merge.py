"""``ftframe merge``: merged folders compute what base + adapter computed; combining LoRA adapters; bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ftframe.cli import main
from ftframe.errors import UserError
from ftframe.tools.merge import DEFAULT_PROMPTS, MERGE_REPORT, logits_diff, merge, read_trained
from tests.helpers import (
    ROOT,
    build_tiny_model,
    classification_cli_args,
    loss_gate,
    real_assets_available,
    tiny_fit_args,
)

#: a learning rate far above a real run's, so 3 steps move the adapter well away from its (identity) start
FAST = ("--model.optimizer.learning_rate=0.05", "--model.optimizer.warmup_steps=0")


def _train(tiny_model, tiny_data, tmp_path, method, *extra, steps=3):
    out = tmp_path / f"{method}-adapter"
    main(tiny_fit_args(tiny_model, tiny_data, tmp_path / method, out, f"--model={method}", *FAST, *extra,
                       steps=steps))
    return out


@pytest.fixture(scope="module")
def trained(tiny_model, tiny_data, tmp_path_factory):
    """One trained folder per mergeable method (module scope: trained once)."""
    root = tmp_path_factory.mktemp("merge")
    return {
        "LoRA": _train(tiny_model, tiny_data, root, "LoRA"),
        "DoRA": _train(tiny_model, tiny_data, root, "DoRA"),
        "IA3": _train(tiny_model, tiny_data, root, "IA3"),
        # compute in float32: the reference is then the 4-bit base + adapter without bf16 rounding
        "QLoRA": _train(tiny_model, tiny_data, root, "QLoRA", "--model.compute_dtype=float32"),
        # LoftQ: factors that correct this 4-bit base; the folder records its quantization config
        "LoftQ": _train(tiny_model, tiny_data, root / "loftq", "QLoRA", "--model.compute_dtype=float32",
                        "--model.init=loftq"),
    }


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("method", ["LoRA", "DoRA", "IA3", "QLoRA", "LoftQ"])
def test_merged_folder_computes_base_plus_adapter(trained, tiny_model, tmp_path, method):
    from ftframe.tools.generate import Generator
    from ftframe.tools.merge import load_unmerged

    out = tmp_path / "merged"
    report = merge(adapter=str(trained[method]), output=str(out))
    # a plain transformers folder: no peft files, safetensors weights, config, generation config, tokenizer
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", MERGE_REPORT} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors"}
    merged = _load(out)
    unmerged = load_unmerged(read_trained(str(trained[method])))
    tok = Generator(model=str(out)).tokenizer
    diff = logits_diff(merged, unmerged.eval(), tok, DEFAULT_PROMPTS)
    assert diff["max_abs_diff"] < 1e-4, diff
    assert diff["top1_agreement"] == 1.0
    assert report["written_logits"]["max_abs_diff"] == pytest.approx(diff["max_abs_diff"], abs=1e-6)
    # the adapter matters: the merged model is far from the base alone (so the check above can fail)
    base = _load(tiny_model)
    assert logits_diff(merged, base, tok, DEFAULT_PROMPTS)["max_abs_diff"] > 1e-2
    saved = json.loads((out / MERGE_REPORT).read_text())
    assert saved["method"] == ("QLoRA" if method == "LoftQ" else method) and saved["dtype"] == "float32"
    assert saved["dequantized_4bit_base"] is (method in ("QLoRA", "LoftQ"))


def test_qlora_merges_onto_the_dequantized_base_not_the_original(trained, tiny_model, tmp_path):
    """The merged weights are dequant(quant(W)) + update: what the adapter was trained with, in float32."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out = tmp_path / "merged"
    report = merge(adapter=str(trained["QLoRA"]), output=str(out))
    assert "dequantized" in report["note"]
    merged = _load(out)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    q = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=quant, dtype=torch.float32)
    # an untargeted weight (the norm) is the base's; a targeted one differs from the original by the update only
    o_proj = q.model.layers[0].self_attn.o_proj.weight
    dequantized = bnb.functional.dequantize_4bit(o_proj.data, o_proj.quant_state).float()
    original = _load(tiny_model).model.layers[0].self_attn.o_proj.weight
    merged_w = merged.model.layers[0].self_attn.o_proj.weight
    from safetensors.torch import load_file

    lora = load_file(str(trained["QLoRA"] / "adapter_model.safetensors"))
    a = next(v for k, v in lora.items() if "layers.0.self_attn.o_proj.lora_A" in k)
    b = next(v for k, v in lora.items() if "layers.0.self_attn.o_proj.lora_B" in k)
    cfg = json.loads((trained["QLoRA"] / "adapter_config.json").read_text())
    update = b.float() @ a.float() * (cfg["lora_alpha"] / cfg["r"])
    assert torch.allclose(merged_w, dequantized + update, atol=1e-6)
    assert (merged_w - (original + update)).abs().max() > 1e-3  # not merged onto the original weights


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sixteen_bit_output_is_saved_in_that_dtype_and_checked(trained, tmp_path, dtype):
    out = tmp_path / dtype
    report = merge(adapter=str(trained["LoRA"]), output=str(out), dtype=dtype)
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == dtype
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {getattr(torch, dtype)}
    assert report["merge_logits"]["max_abs_diff"] < 1e-4  # the merge itself is float32
    assert 0 < report["written_logits"]["max_abs_diff"] <= report["tolerance"]


def test_a_difference_over_the_tolerance_writes_nothing(trained, tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(UserError, match=r"differ from the unmerged model's by up to .* nothing was written"):
        merge(adapter=str(trained["LoRA"]), output=str(out), dtype="bfloat16", tolerance=1e-9)
    assert not out.exists() and not (tmp_path / "merged.tmp").exists()


def test_existing_output_is_kept_unless_overwrite(trained, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match=r"--output .* exists; .* --overwrite true"):
        merge(adapter=str(trained["LoRA"]), output=str(out))
    assert (out / "keep.txt").read_text() == "x"
    merge(adapter=str(trained["LoRA"]), output=str(out), overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


# ------------------------------------------------------------------------------------------------- combining
@pytest.fixture(scope="module")
def two_loras(tiny_model, tiny_data, tmp_path_factory):
    """Two LoRA adapters on the same base trained on different data (and seeds)."""
    root = tmp_path_factory.mktemp("combine")
    other = root / "other.jsonl"
    rows = [json.loads(line) for line in Path(tiny_data).read_text().splitlines()]
    other.write_text("".join(json.dumps({"id": r["id"], "prompt": r["completion"], "completion": r["prompt"]}) + "\n"
                             for r in rows))
    first = _train(tiny_model, tiny_data, root, "LoRA", "--seed_everything=1")
    second_root = root / "second"
    second = second_root / "adapter"
    main(tiny_fit_args(tiny_model, str(other), second_root, second, "--model=LoRA", "--seed_everything=7", *FAST,
                       steps=3))
    return first, second


@pytest.mark.parametrize("combination", ["linear", "ties", "dare_linear", "dare_ties", "svd"])
def test_combined_adapter_loads_in_plain_peft(two_loras, tiny_model, tmp_path, combination):
    from peft import PeftModel

    out = tmp_path / "combined"
    report = merge(adapters=[str(p) for p in two_loras], output=str(out), combination=combination,
                   weights=[0.7, 0.5])
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert report["reload_logits"]["max_abs_diff"] < 1e-5
    combined = PeftModel.from_pretrained(_load(tiny_model), str(out)).eval()
    first = PeftModel.from_pretrained(_load(tiny_model), str(two_loras[0])).eval()
    second = PeftModel.from_pretrained(_load(tiny_model), str(two_loras[1])).eval()
    tok = read_trained(str(out))  # the folder is a complete trained folder: metadata and tokenizer too
    assert tok.method == "LoRA" and (out / "tokenizer.json").is_file()
    from ftframe.models import load_tokenizer

    tokenizer = load_tokenizer(str(out))
    # a real mix: different from each input
    assert logits_diff(combined, first, tokenizer, DEFAULT_PROMPTS)["max_abs_diff"] > 1e-3
    assert logits_diff(combined, second, tokenizer, DEFAULT_PROMPTS)["max_abs_diff"] > 1e-3
    meta = json.loads((out / "ftframe.json").read_text())
    assert meta["combined"]["combination"] == combination and meta["combined"]["weights"] == [0.7, 0.5]


def test_svd_combination_is_the_weighted_sum_of_updates(two_loras, tmp_path):
    """With the rank kept at the sum of the inputs' ranks, svd is exact: delta = w1 * delta1 + w2 * delta2."""
    from safetensors.torch import load_file

    out = tmp_path / "combined"
    r = read_trained(str(two_loras[0])).peft_config["r"]
    merge(adapters=[str(p) for p in two_loras], output=str(out), combination="svd", weights=[0.7, 0.5],
          svd_rank=2 * r)

    def delta(folder, module="layers.0.self_attn.q_proj"):
        cfg = json.loads((Path(folder) / "adapter_config.json").read_text())
        w = load_file(str(Path(folder) / "adapter_model.safetensors"))
        a = next(v for k, v in w.items() if f"{module}.lora_A" in k)
        b = next(v for k, v in w.items() if f"{module}.lora_B" in k)
        return b @ a * (cfg["lora_alpha"] / cfg["r"])

    expected = 0.7 * delta(two_loras[0]) + 0.5 * delta(two_loras[1])
    assert torch.allclose(delta(out), expected, atol=1e-5)


def test_combination_errors(two_loras, trained, tmp_path):
    a, b = (str(p) for p in two_loras)
    with pytest.raises(SystemExit) as e:
        main(["merge", "--adapters", f"[{a}, {b}]", "--combination", "tie", f"--output={tmp_path / 'x'}"])
    assert e.value.code == 2
    with pytest.raises(UserError, match=r"--combination 'tie' is unknown; did you mean 'ties'"):
        merge(adapters=[a, b], output=str(tmp_path / "x"), combination="tie")  # type: ignore[arg-type]
    with pytest.raises(UserError, match=r"--weights has 1 values for 2 adapters"):
        merge(adapters=[a, b], output=str(tmp_path / "x"), weights=[1.0])
    with pytest.raises(UserError, match=r"is a IA3 adapter; combining works on LoRA adapters"):
        merge(adapters=[a, str(trained["IA3"])], output=str(tmp_path / "x"))
    with pytest.raises(UserError, match=r"is a LoftQ adapter: .* would apply that correction once per adapter"):
        merge(adapters=[a, str(trained["LoftQ"])], output=str(tmp_path / "x"))
    with pytest.raises(UserError, match=r"either --adapter FOLDER .* or --adapters"):
        merge(adapter=a, adapters=[a, b], output=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_qlora_adapters_combine_on_their_4bit_base(trained, two_loras, tmp_path):
    """Half of one QLoRA adapter plus half of itself (svd) is that adapter again, on the same 4-bit base."""
    from ftframe.methods.qlora import BASE_QUANTIZATION_FILE
    from ftframe.tools.generate import Generator

    q = str(trained["QLoRA"])
    out = tmp_path / "combined"
    merge(adapters=[q, q], output=str(out), combination="svd", weights=[0.5, 0.5])
    assert (out / BASE_QUANTIZATION_FILE).is_file()
    combined, single = Generator(adapter=str(out)), Generator(adapter=q)
    assert logits_diff(combined.model, single.model, single.tokenizer, DEFAULT_PROMPTS)["max_abs_diff"] < 1e-4
    with pytest.raises(UserError, match=r"differently stored bases"):
        merge(adapters=[q, str(two_loras[0])], output=str(tmp_path / "x"))


def test_combining_adapters_of_different_bases_is_refused(two_loras, tmp_path):
    other = tmp_path / "other-base"
    import shutil

    shutil.copytree(two_loras[1], other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "some/other-model"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"were trained on different bases"):
        merge(adapters=[str(two_loras[0]), str(other)], output=str(tmp_path / "x"))


# ------------------------------------------------------------------------------------------------- bad inputs
def test_adapter_base_mismatch_is_a_clear_error(trained, tmp_path):
    other = build_tiny_model(tmp_path / "wider", hidden_size=96)
    with pytest.raises(UserError, match=r"was trained on .* it does not fit the base"):
        merge(adapter=str(trained["LoRA"]), model=str(other), output=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_unmergeable_methods_say_why(tiny_model, tiny_data, tmp_path):
    prompt = _train(tiny_model, tiny_data, tmp_path, "PromptTuning", steps=1)
    with pytest.raises(UserError, match=r"PROMPT_TUNING adapter: it learns virtual tokens .* cannot be merged"):
        merge(adapter=str(prompt), output=str(tmp_path / "x"))
    bottleneck = _train(tiny_model, tiny_data, tmp_path, "BottleneckAdapters", steps=1)
    with pytest.raises(UserError, match=r"bottleneck adapters: .* nothing to merge"):
        merge(adapter=str(bottleneck), output=str(tmp_path / "y"))
    with pytest.raises(UserError, match=r"--adapter .* is not a folder"):
        merge(adapter=str(tmp_path / "missing"), output=str(tmp_path / "z"))


def test_combine_cli_takes_space_separated_lists(two_loras, tmp_path, capsys):
    out = tmp_path / "combined"
    main(["merge", "--adapters", *map(str, two_loras), "--weights", "0.5", "1", "--combination", "ties",
          f"--output={out}"])
    meta = json.loads((out / "ftframe.json").read_text())["combined"]
    assert meta["adapters"] == [str(p) for p in two_loras] and meta["weights"] == [0.5, 1.0]
    assert "combined adapter (r=" in capsys.readouterr().out


def test_merge_cli_writes_and_reports(trained, tmp_path, capsys):
    out = tmp_path / "merged"
    main(["merge", f"--adapter={trained['DoRA']}", f"--output={out}"])
    printed = capsys.readouterr().out
    assert "max abs diff" in printed and f"merged model written to {out}" in printed
    assert (out / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------- evaluation gate
def test_gate_passes_a_faithful_merge_and_records_it(trained, tiny_data, tmp_path):
    out = tmp_path / "merged"
    report = merge(adapter=str(trained["LoRA"]), output=str(out), eval=loss_gate(tmp_path, tiny_data, 1e-4))
    gate = json.loads((out / MERGE_REPORT).read_text())["eval_gate"]
    assert gate["passed"] and report["eval_gate"]["passed"]
    (row,) = gate["evaluations"]
    assert row["metric"] == "loss" and row["candidate"] == pytest.approx(row["compared_with"], rel=1e-5)


def _reversed_copy(adapter: Path, out: Path, factor: float = -3.0) -> Path:
    """A copy of a LoRA folder whose update is ``factor`` times the original's (every ``lora_B`` scaled)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    weights = load_file(out / "adapter_model.safetensors")
    save_file({k: v * factor if "lora_B" in k else v for k, v in weights.items()}, out / "adapter_model.safetensors")
    return out


def test_gate_refuses_or_marks_a_combination_that_loses_a_task(two_loras, tiny_data, tmp_path):
    """The second adapter is the first one's update reversed and tripled: adding the two moves the base twice as far
    the wrong way, so the combination is worse on the first task than the first adapter alone, whatever the seeds."""
    a = str(two_loras[0])
    b = str(_reversed_copy(two_loras[0], tmp_path / "reversed"))
    out = tmp_path / "combined"
    with pytest.raises(UserError, match=r"evaluation gate FAILED(.|\n)*nothing was written"):
        merge(adapters=[a, b], output=str(out), combination="cat", eval=loss_gate(tmp_path, tiny_data, 0.0))
    assert not out.exists() and not (tmp_path / "combined.tmp").exists()
    report = merge(adapters=[a, b], output=str(out), combination="cat",
                   eval=loss_gate(tmp_path, tiny_data, 0.0, on_fail="mark"))
    assert out.is_dir() and not report["eval_gate"]["passed"]
    (row,) = report["eval_gate"]["evaluations"]
    assert set(row["references"]) == {a, b}
    assert row["compared_with"] == min(row["references"].values()) == row["references"][a]  # the better input
    assert row["candidate"] > row["compared_with"]


def test_gate_compare_directions():
    from ftframe.tools.gate import EvalGate

    gate = EvalGate([{"name": "acc", "metric": "acc", "max_drop": 0.02},
                     {"name": "ppl", "metric": "perplexity", "max_drop": 0.05}])
    ok = gate.compare({"acc": 0.49, "ppl": 10.4}, {"unmerged": {"acc": 0.5, "ppl": 10.0}})
    assert ok.passed  # one point of accuracy lost (budget 2), perplexity 4 % higher (budget 5 %)
    bad = gate.compare({"acc": 0.47, "ppl": 10.6}, {"unmerged": {"acc": 0.5, "ppl": 10.0}})
    assert [r["passed"] for r in bad.rows] == [False, False]
    assert "FAIL" in bad.markdown()
    better = gate.compare({"acc": 0.9, "ppl": 5.0}, {"unmerged": {"acc": 0.5, "ppl": 10.0}})
    assert better.passed and better.rows[0]["drop"] < 0


@pytest.mark.parametrize(("text", "message"), [
    ("evaluations:\n  - task: loss\n    dta: gsm8k\n    max_drop: 0.1\n", r"evaluations\[0\]: unknown key 'dta'; did you mean 'data'"),
    ("evaluations:\n  - task: loss\n    data: gsm8k\n", r"evaluations\[0\]: 'max_drop' is required"),
    ("on_fail: warn\nevaluations:\n  - {task: loss, max_drop: 0.1}\n", r"on_fail 'warn' must be 'refuse' or 'mark'"),
    ("evaluations:\n  - {task: loss, metric: accuracy, max_drop: 0.1}\n", r"metric 'accuracy' is not one of"),
    ("evaluations: []\n", r"non-empty list 'evaluations'"),
    ("evaluations:\n  - {task: loss, max_drop: -1}\n", r"max_drop must be a number >= 0"),
])
def test_gate_file_errors_name_the_file_and_key(tmp_path, text, message):
    from ftframe.tools.gate import EvalGate

    path = tmp_path / "gate.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        EvalGate.from_file(path)
    with pytest.raises(UserError, match=r"--eval .*missing.yaml: no such file"):
        EvalGate.from_file(tmp_path / "missing.yaml")


# ------------------------------------------------------------------------------------------------- default model
@pytest.mark.slow
@pytest.mark.skipif(not real_assets_available(), reason="run `ftframe download` first (.ci/run does)")
def test_merge_on_the_default_model(tmp_path):
    """A LoRA adapter on SmolLM2-135M-Instruct (GGUF asset) merges into a folder transformers loads on its own."""
    adapter = tmp_path / "adapter"
    main(tiny_fit_args("smollm2-135m-instruct", "gsm8k", tmp_path, adapter, "--data.max_train_examples=16",
                       "--data.max_length=128", "--model.optimizer.learning_rate=0.01", "--model.optimizer.warmup_steps=0", steps=2))
    out = tmp_path / "merged"
    report = merge(adapter=str(adapter), output=str(out))
    assert report["written_logits"]["max_abs_diff"] < 1e-3 and report["written_logits"]["top1_agreement"] == 1.0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)  # no peft, no ftframe
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and model.config.model_type == "llama"
    # its generation config (written, not defaulted) stops at the tokenizer's end of turn
    assert (out / "generation_config.json").is_file()
    eos = model.generation_config.eos_token_id
    assert tok.eos_token_id in (eos if isinstance(eos, list) else [eos]), (eos, tok.eos_token_id)


def test_docs_list_every_merge_option():
    import inspect
    import re

    doc = (ROOT / "docs" / "merge.md").read_text()
    table = doc.split("### Options", 1)[1].split("\n\n", 2)[1]
    documented = re.findall(r"^\| `--(\w+)` \|", table, flags=re.M)
    assert documented == list(inspect.signature(merge).parameters)


def test_classifier_adapter_merges_with_its_head(tiny_model, cls_data, tmp_path):
    """A LoRA classifier (decoder + fresh head saved with the adapter) merges into a sequence-classification folder."""
    from transformers import AutoModelForSequenceClassification

    adapter = tmp_path / "adapter"
    main(["fit", *classification_cli_args(tiny_model, cls_data, tmp_path), "--model.optimizer.learning_rate=0.05",
          "--trainer.max_steps=3", "--trainer.enable_checkpointing=false", f"--adapter.dirpath={adapter}"])
    out = tmp_path / "merged"
    report = merge(adapter=str(adapter), output=str(out), prompts=["the film was great", "a dull plot"])
    assert report["written_logits"]["max_abs_diff"] < 1e-4
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    assert merged.config.id2label == {0: "mid", 1: "neg", 2: "pos"}
