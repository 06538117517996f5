"""DDP on the CPU for every method: 2 processes x 2 examples train like 1 process x 4, and their adapters reload.

The data has completions of equal token length, so each rank's mean loss weighs its examples as the single process
does; DDP's averaged gradient is then the single process's gradient, and the two runs agree up to float rounding.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import WORDS
from tests.test_methods_contract import METHODS

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["FullFineTune", "LoRA", "DoRA", "IA3", "LastLayers", "PromptTuning", "PTuning", "PrefixTuning",
         "BottleneckAdapters", "QLoRA", "LoftQ"]
STEPS = 4
PRECISIONS = ["32-true", "bf16-mixed"]
#: how close 2 x 2 examples stay to 1 x 4 after 4 steps: float32 sums in another order; bf16 autocast rounds them
LOSS_TOLERANCE = {"32-true": 1e-4, "bf16-mixed": 2e-2}
WEIGHT_TOLERANCE = {"32-true": 1e-3, "bf16-mixed": 5e-2}

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def even_data(tmp_path_factory) -> str:
    """Arithmetic in words; every completion is 6 tokens of the tiny tokenizer (each number word is one token)."""
    records = []
    for i in range(48):
        a, b = i % 10, (i * 7 + 3) % 10
        records.append({"prompt": f"What is {WORDS[a]} plus {WORDS[b]}?",
                        "completion": f"{WORDS[a]} plus {WORDS[b]} is {WORDS[(a + b) % 10]}."})
    path = tmp_path_factory.mktemp("even") / "even.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def runs(tiny_model, even_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    for precision in PRECISIONS:
        for devices, batch in ((2, 2), (1, 4)):
            proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_job.py"),
                                   str(out / precision / f"devices{devices}"), tiny_model, even_data, str(devices),
                                   str(batch), str(STEPS), precision, *NAMES],
                                  cwd=ROOT, capture_output=True, text=True, timeout=1200)
            assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", NAMES)
def test_two_processes_train_like_one_with_the_same_global_batch(name, precision, runs):
    ddp = json.loads((runs / precision / "devices2" / name / "losses.json").read_text())
    single = json.loads((runs / precision / "devices1" / name / "losses.json").read_text())
    assert len(ddp) == len(single) == STEPS
    assert ddp[-1] != ddp[0], "the loss did not move"
    assert ddp == pytest.approx(single, rel=LOSS_TOLERANCE[precision], abs=1e-5)
    a = load_file(str(runs / precision / "devices2" / name / "trained.safetensors"))
    b = load_file(str(runs / precision / "devices1" / name / "trained.safetensors"))
    assert a.keys() == b.keys() and a
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < WEIGHT_TOLERANCE[precision], f"trained weights differ by up to {worst}"


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", NAMES)
def test_an_adapter_saved_under_ddp_loads_in_one_process_with_the_same_logits(name, precision, runs, tiny_model):
    folder = runs / precision / "devices2" / name
    _, _, _, reload = METHODS[name]
    model = reload(str(folder / "artifact"), tiny_model).eval()
    saved = torch.load(folder / "logits.pt", weights_only=True)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-mixed"):
        logits = model(input_ids=saved["input_ids"], attention_mask=saved["attention_mask"]).logits
    atol = 1e-5 if precision == "32-true" else 2e-2  # bf16: the same roundings, summed in another order
    assert torch.allclose(logits.float(), saved["logits"].float(), atol=atol), (logits - saved["logits"]).abs().max()


def test_rank_shards_split_the_seeded_order_without_reshuffling_it():
    from ftframe.data.collate import RankShard, ResumableSampler

    sampler = ResumableSampler(11, seed=3)
    sampler.set_epoch(2)
    order = list(sampler)
    shards = [RankShard(ResumableSampler(11, seed=3), num_replicas=2, rank=r) for r in (0, 1)]
    for shard in shards:
        shard.set_epoch(2)  # Lightning calls this; it reaches the wrapped sampler
    got = [list(s) for s in shards]
    assert [len(s) for s in shards] == [6, 6] and got[0] == order[0::2] and got[1] == order[1::2] + order[:1]
    # a resumed epoch skips what both ranks consumed (examples of the whole order) and slices the rest alike
    resumed = RankShard(ResumableSampler(11, seed=3), num_replicas=2, rank=1)
    resumed.sampler.resume_from(2, 4)
    resumed.set_epoch(2)
    assert len(resumed) == 4 and list(resumed) == (order[4:] + order[4:5])[1::2]


def test_qlora_stores_4bit_weights_in_the_compute_dtype_under_fsdp(tiny_model):
    from types import SimpleNamespace

    from ftframe.methods import QLoRA

    class FSDPStrategy:  # stands for Lightning's (which refuses to exist without a GPU)
        pass

    module = QLoRA(model_name=tiny_model, compute_dtype="bfloat16")
    assert module.quantization_config().bnb_4bit_quant_storage == torch.uint8  # bitsandbytes' default
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())
    config = module.quantization_config()
    assert config.bnb_4bit_quant_storage == torch.bfloat16 and config.bnb_4bit_compute_dtype == torch.bfloat16
    assert QLoRA(model_name=tiny_model, quant_storage="float16").quantization_config().bnb_4bit_quant_storage \
        == torch.float16
