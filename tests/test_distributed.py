"""DDP and FSDP on the CPU for every method: 2 processes x 2 examples train like 1 process x 4; adapters reload.

The data has completions of equal token length, so each rank's mean loss weighs its examples as the single process
does; the averaged gradient is then the single process's gradient, and the runs agree up to float rounding.

FSDP runs Lightning's FSDPStrategy over gloo (``tests/ddp_job.py``'s ``CPUFSDPStrategy``: Lightning refuses FSDP on
CPUs, torch's FSDP needs to be told the CPU is its device); its adapters are gathered from the shards by
``AdapterExport`` and must reload in one process with the single-process run's logits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftframe.artifacts import read_trained
from ftframe.methods import variants
from tests.helpers import DISTRIBUTED_STEPS, WORDS

ROOT = Path(__file__).resolve().parents[1]
#: the methods with a row in the compatibility matrix (ftframe.methods.Variant.matrix)
NAMES = list(variants(matrix=True))
STEPS = DISTRIBUTED_STEPS
PRECISIONS = ["32-true", "bf16-mixed"]
#: how close 2 x 2 examples stay to 1 x 4 after 4 steps: float32 sums in another order; bf16 autocast rounds them
LOSS_TOLERANCE = {"32-true": 1e-4, "bf16-mixed": 2e-2}
WEIGHT_TOLERANCE = {"32-true": 1e-3, "bf16-mixed": 5e-2}
#: under FSDP + bf16-mixed the 4-bit base is quantized from bfloat16 weights (the dtype FSDP computes in; the reload
#: and the single process quantize float32 ones): LoftQ starts from that other quantization error, and QLoRA's logits
#: carry it (in 32-true both quantize float32 weights and the strict tolerances hold)
FSDP_WEIGHT_TOLERANCE = {("LoftQ", "bf16-mixed"): 0.2}
FSDP_QUANTIZED_FROM_BF16_LOGIT_TOLERANCE = 0.5
#: an adapter trained under FSDP vs the single process's model: the weight differences above, through the network
FSDP_LOGIT_TOLERANCE = {"32-true": 1e-3, "bf16-mixed": 1e-1}

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def runs(tiny_model, even_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    for precision in PRECISIONS:
        for strategy, devices, batch in (("ddp", 2, 2), ("ddp", 1, 4), ("fsdp", 2, 2)):
            folder = out / precision / (f"devices{devices}" if strategy == "ddp" else strategy)
            proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_job.py"), str(folder), tiny_model,
                                   even_data, strategy, str(devices), str(batch), str(STEPS), precision, *NAMES],
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
    model = variants()[name][0].load_trained(read_trained(str(folder / "artifact")), tiny_model).eval()
    saved = torch.load(folder / "logits.pt", weights_only=True)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-mixed"):
        logits = model(input_ids=saved["input_ids"], attention_mask=saved["attention_mask"]).logits
    atol = 1e-5 if precision == "32-true" else 2e-2  # bf16: the same roundings, summed in another order
    assert torch.allclose(logits.float(), saved["logits"].float(), atol=atol), (logits - saved["logits"]).abs().max()


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", NAMES)
def test_fsdp_two_processes_train_like_one_with_the_same_global_batch(name, precision, runs):
    fsdp = json.loads((runs / precision / "fsdp" / name / "losses.json").read_text())
    single = json.loads((runs / precision / "devices1" / name / "losses.json").read_text())
    assert len(fsdp) == STEPS and fsdp[-1] != fsdp[0]
    assert fsdp == pytest.approx(single, rel=LOSS_TOLERANCE[precision], abs=1e-5)
    a = load_file(str(runs / precision / "fsdp" / name / "trained.safetensors"))  # gathered from the shards
    b = load_file(str(runs / precision / "devices1" / name / "trained.safetensors"))
    assert a and a.keys() <= b.keys() and all(a[k].shape == b[k].shape for k in a)
    for tied in b.keys() - a.keys():  # gathered once under its first name, as a single process saves it
        assert any(torch.equal(b[tied], b[k]) for k in a), tied
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    tolerance = FSDP_WEIGHT_TOLERANCE.get((name, precision), WEIGHT_TOLERANCE[precision])
    assert worst < tolerance, f"trained weights differ by up to {worst}"


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", NAMES)
def test_fsdp_adapter_gathered_from_shards_reloads_with_the_single_process_logits(name, precision, runs, tiny_model):
    model = variants()[name][0].load_trained(read_trained(str(runs / precision / "fsdp" / name / "artifact")), tiny_model).eval()
    saved = torch.load(runs / precision / "devices1" / name / "logits.pt", weights_only=True)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-mixed"):
        logits = model(input_ids=saved["input_ids"], attention_mask=saved["attention_mask"]).logits
    files = {f.name: set(load_file(str(f))) for f in (runs / precision / "fsdp" / name / "artifact").glob("*.safetensors")}
    single = {f.name: set(load_file(str(f)))
              for f in (runs / precision / "devices1" / name / "artifact").glob("*.safetensors")}
    assert files == single and files  # the same files with the same tensor names as a single process writes
    worst = float((logits.float() - saved["logits"].float()).abs().max())
    tolerance = FSDP_LOGIT_TOLERANCE[precision]
    if name in ("QLoRA", "LoftQ") and precision == "bf16-mixed":
        tolerance = FSDP_QUANTIZED_FROM_BF16_LOGIT_TOLERANCE
    assert worst < tolerance, worst


def test_fsdp_checkpoints_resume_and_forgetting_is_measured_on_every_rank(tiny_model, even_data, tmp_path):
    """LoRA under FSDP with AdapterCheckpoint, ForgettingMonitor and AdapterExport: the forgetting measurements equal
    a single process's with the same global batch; resuming the step-2 checkpoint (a file of trainable weights, or a
    folder of shards) ends where the run without the interruption ended."""
    reference = tmp_path / "reference.txt"
    reference.write_text(" ".join(f"{WORDS[i % 10]} plus {WORDS[(i * 3) % 10]}." for i in range(200)), encoding="utf-8")
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"question": f"What is {WORDS[a]} plus {WORDS[b]}?", "label": 0,
                                         "choices": [WORDS[(a + b) % 10], WORDS[(a + b + 1) % 10]]}) + "\n"
                             for a in range(3) for b in range(2)), encoding="utf-8")

    def run(out, strategy, devices, batch, *resume):
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fsdp_callbacks_job.py"), str(tmp_path / out),
                               tiny_model, even_data, str(reference), str(probe), strategy, str(devices), str(batch),
                               "4", *resume], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads((tmp_path / out / "forgetting" / "forgetting.json").read_text())["history"]

    single, fsdp = run("single", "single", 1, 4), run("fsdp", "fsdp", 2, 2)
    checkpoints = tmp_path / "fsdp" / "checkpoints"
    assert {p.name for p in checkpoints.iterdir()} == {"step=000002", "step=000004", "last"}
    resumed = run("resumed", "fsdp", 2, 2, str(checkpoints / "step=000002"))
    assert [h["step"] for h in fsdp] == [h["step"] for h in single] == [0, 4]
    for mine, theirs in zip(fsdp, single, strict=True):  # every rank scored everything through the wrapped root
        assert mine["ref_nll"] == pytest.approx(theirs["ref_nll"], rel=1e-5)
        assert mine["kl"] == pytest.approx(theirs["kl"], rel=1e-3, abs=1e-7)
        assert mine["probe_acc"] == theirs["probe_acc"]
    assert fsdp[-1]["kl"] > 0
    assert resumed[-1]["ref_nll"] == pytest.approx(fsdp[-1]["ref_nll"], rel=1e-6)
    final = load_file(str(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors"))
    again = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    alone = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    assert final.keys() == again.keys() == alone.keys()
    assert max(float((final[k] - again[k]).abs().max()) for k in final) < 1e-6
    assert max(float((final[k] - alone[k]).abs().max()) for k in final) < 1e-3
    ckpt = torch.load(checkpoints / "step=000002" / "resume.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])  # trainable weights only
    # state_dict_type: sharded (configs/strategy/fsdp.yaml): resume.ckpt is a folder with one file per rank
    run("sharded", "fsdp-sharded", 2, 2)
    shards = tmp_path / "sharded" / "checkpoints" / "step=000002" / "resume.ckpt"
    assert shards.is_dir() and len(list(shards.glob("*.distcp"))) == 2
    run("sharded-resumed", "fsdp-sharded", 2, 2, str(shards.parent))
    final = load_file(str(tmp_path / "sharded" / "adapter" / "adapter_model.safetensors"))
    again = load_file(str(tmp_path / "sharded-resumed" / "adapter" / "adapter_model.safetensors"))
    assert final.keys() == alone.keys() and max(float((final[k] - again[k]).abs().max()) for k in final) < 1e-6


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


def test_qlora_stores_4bit_weights_in_the_dtype_fsdp_computes_in(tiny_model):
    from types import SimpleNamespace

    from ftframe.methods import QLoRA

    class FSDPStrategy:  # stands for Lightning's (which refuses to exist without a GPU)
        pass

    module = QLoRA(model_name=tiny_model, compute_dtype="bfloat16")
    assert module.quantization_config().bnb_4bit_quant_storage == torch.uint8  # bitsandbytes' default
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(), precision="bf16-mixed")
    config = module.quantization_config()  # what FSDP casts the flat weights to under bf16-mixed
    assert config.bnb_4bit_quant_storage == torch.bfloat16 and config.bnb_4bit_compute_dtype == torch.bfloat16
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(), precision="32-true")
    assert module.quantization_config().bnb_4bit_quant_storage == torch.float32
    assert QLoRA(model_name=tiny_model, quant_storage="float16").quantization_config().bnb_4bit_quant_storage \
        == torch.float16


class _Stub:
    """Stands for a Lightning strategy, which cannot be built here (FSDP and DeepSpeed refuse the CPU)."""

    def __init__(self, name: str, **attrs) -> None:
        self.__class__ = type(name, (_Stub,), {})
        self.__dict__.update(attrs)


def test_combinations_that_cannot_shard_are_refused_at_start_up(tiny_model):
    from types import SimpleNamespace

    from ftframe.callbacks import ForgettingMonitor
    from ftframe.errors import UserError
    from ftframe.methods import LoRA, QLoRA

    zero3 = SimpleNamespace(strategy=_Stub("DeepSpeedStrategy", zero_stage_3=True), precision="bf16-mixed")
    qlora = QLoRA(model_name=tiny_model)
    qlora._trainer = zero3
    with pytest.raises(UserError, match=r"QLoRA cannot run under DeepSpeed ZeRO-3.*configs/strategy/fsdp.yaml"):
        qlora.load_base_model()
    fsdp = SimpleNamespace(strategy=_Stub("FSDPStrategy", root_device=torch.device("cpu")), precision="bf16-mixed",
                           world_size=1)
    qlora = QLoRA(model_name=tiny_model, quant_storage="uint8")
    qlora._trainer = fsdp
    with pytest.raises(UserError, match=r"quant_storage 'uint8' under FSDPStrategy.*Use quant_storage: auto"):
        qlora.load_base_model()
    pissa = LoRA(model_name=tiny_model, init="pissa")
    pissa._trainer = fsdp
    with pytest.raises(UserError, match=r"init 'pissa' cannot run under FSDPStrategy.*init: default"):
        pissa.check_base(None)
    monitor = ForgettingMonitor(reference="sotu", kl="initial_weights", probe=None)
    with pytest.raises(UserError, match=r"kl: initial_weights cannot run under FSDPStrategy"):
        monitor._choose_kl(fsdp, LoRA(model_name=tiny_model))
