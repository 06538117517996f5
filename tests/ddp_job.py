"""A training job for tests/test_distributed.py, run as a script so Lightning's DDP launcher can start its ranks.

    python tests/ddp_job.py OUT MODEL DATA STRATEGY DEVICES BATCH STEPS PRECISION METHOD [METHOD ...]

For each method (a variant label of ``ftframe.methods.variants()``) it trains ``STEPS`` steps on the CPU with
``DEVICES`` processes of ``BATCH`` examples each, in Lightning precision ``PRECISION``, under ``STRATEGY`` (``ddp``, or
``fsdp``: Lightning's FSDPStrategy on the CPU through :class:`CPUFSDPStrategy`; on CUDA GPUs ``gpu`` (one device, or
DDP), ``fsdp-gpu``, ``deepspeed_zero2``, ``deepspeed_zero3``), and writes, from rank 0,
``OUT/<method>/``: ``losses.json`` (the loss of every step, averaged over the ranks), ``trained.safetensors`` (the
trainable weights), ``logits.pt`` (the trained model's logits on a fixed padded batch; only for ``ddp`` and ``gpu``: a
sharded model runs only through its wrapped root) and ``artifact/`` (for the other strategies the folder AdapterExport
writes, gathered from the shards).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.fsdp._init_utils as fsdp_init_utils
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies import fsdp as lightning_fsdp
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ftframe.callbacks import AdapterExport  # noqa: E402
from ftframe.data import InstructionDataModule  # noqa: E402
from ftframe.distributed import PROMPT_EMBEDDINGS, fsdp_auto_wrap_policy, gather_weights  # noqa: E402
from ftframe.methods import variants  # noqa: E402
from ftframe.optim import OptimizerSettings
from ftframe.packing import unpack  # noqa: E402
from tests.helpers import tiny_trainer  # noqa: E402


class StepLosses(Callback):
    """The loss of each optimizer step, averaged over the ranks (what DDP's averaged gradient is the gradient of)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach().clone()
        if trainer.world_size > 1:
            dist.all_reduce(loss)
            loss /= trainer.world_size
        self.losses.append(float(loss))


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, run on CPU processes over gloo: only the device FSDP is told to use differs.

    Lightning refuses FSDP without a GPU (for the string ``fsdp`` and the exact class, not subclasses), and torch's
    FSDP needs ``device_id=cpu`` to accept CPU parameters, which Lightning passes as ``None`` on the CPU. Everything
    else -- wrapping, flat parameters, sharded optimizer state, state dicts -- is the code a GPU run uses, except that
    full state dicts are not offloaded to the CPU (pinned memory needs CUDA) and FSDP's check that rank 0's weights are
    broadcast from GPU tensors is skipped (gloo sends CPU tensors). Tests only.
    """

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import torch.distributed.fsdp as fsdp

        original = fsdp.FullyShardedDataParallel

        class OnCPU(original):  # type: ignore[misc, valid-type]
            def __init__(self, *args, device_id=None, **kwargs) -> None:
                super().__init__(*args, device_id=torch.device("cpu") if device_id is None else device_id, **kwargs)

        fsdp.FullyShardedDataParallel = OnCPU
        try:
            return super()._setup_model(model)
        finally:
            fsdp.FullyShardedDataParallel = original


def _full_state_dict_context_on_cpu(module: torch.nn.Module, world_size: int, rank0_only: bool = True):
    """Lightning's full-state-dict context without ``offload_to_cpu``: offloading pins memory, which crashes without
    CUDA (the tensors are on the CPU already)."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(module=module, state_dict_type=StateDictType.FULL_STATE_DICT,
                                state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                                optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False,
                                                                                 rank0_only=rank0_only))


lightning_fsdp._get_full_state_dict_context = _full_state_dict_context_on_cpu
# FSDP refuses to broadcast rank 0's weights (sync_module_states, used when ranks > 0 build on the meta device) from
# CPU tensors, which NCCL could not send; gloo can
fsdp_init_utils._check_module_states_for_sync_module_states = lambda module_states: None


class CPUFSDPPrecision(FSDPPrecision):
    """Lightning's FSDP precision plugin with the CPU's autocast where a GPU run has CUDA's (mixed precisions)."""

    def forward_context(self):
        if "mixed" in self.precision:
            return torch.autocast("cpu", dtype=torch.bfloat16 if self.precision == "bf16-mixed" else torch.float16)
        return super().forward_context()


#: strategies of GPU runs (tests/test_gpu.py): ``gpu`` is the single-device (or DDP) reference
GPU_STRATEGIES = ("gpu", "fsdp-gpu", "deepspeed_zero2", "deepspeed_zero3")


def make_strategy(name: str, devices: int, precision: str):
    if name in ("fsdp", "fsdp-sharded"):  # checkpoints: one file of trainable weights, or a folder of shards
        return CPUFSDPStrategy(auto_wrap_policy=fsdp_auto_wrap_policy, process_group_backend="gloo",
                               state_dict_type="sharded" if name == "fsdp-sharded" else "full",
                               precision_plugin=CPUFSDPPrecision(precision))
    if name == "fsdp-gpu":
        return FSDPStrategy(auto_wrap_policy=fsdp_auto_wrap_policy, state_dict_type="full")
    if name.startswith("deepspeed_zero"):
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(stage=int(name[-1]), exclude_frozen_parameters=True)
    return "ddp" if devices > 1 else "auto"


def main() -> None:
    out, model, data, strategy, devices, batch, steps, precision, *names = sys.argv[1:]
    for name in names:
        seed_everything(0)
        cls, variant = variants()[name]
        module = cls(model_name=model, optimizer=OptimizerSettings(learning_rate=1e-2), **variant.options)
        dm = InstructionDataModule(train_files=data, tokenizer=model, val_size=8, batch_size=int(batch),
                                   cache_dir=str(Path(out) / "cache"))
        recorder = StepLosses()
        trainer = tiny_trainer(Path(out) / name, max_steps=int(steps), devices=int(devices),
                               strategy=make_strategy(strategy, int(devices), precision), callbacks=[recorder],
                               precision=None if strategy == "fsdp" else precision,
                               accelerator="gpu" if strategy in GPU_STRATEGIES else "cpu")
        trainer.fit(module, datamodule=dm)
        if strategy not in ("ddp", "gpu"):  # every rank takes part in gathering the shards
            if strategy.startswith("fsdp"):
                # rank 0 alone read the weights; the others built the model on the meta device (QLoRA: every rank)
                assert module.built_on_meta == (trainer.global_rank > 0 and module.meta_init), module.built_on_meta
            weights = gather_weights(trainer, module, trainable_only=True)
            if weights is None:  # ZeRO-2: every rank holds whole weights
                weights = {k: v.detach().cpu() for k, v in module.trainable_state_dict().items()}
            if trainer.is_global_zero:
                folder = Path(out) / name
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "losses.json").write_text(json.dumps(recorder.losses))
                save_file({k: v.clone() for k, v in weights.items() if k != PROMPT_EMBEDDINGS},
                          str(folder / "trained.safetensors"))
            AdapterExport(dirpath=str(Path(out) / name / "artifact")).export(trainer, module)
        elif trainer.is_global_zero:
            folder = Path(out) / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "losses.json").write_text(json.dumps(recorder.losses))
            save_file({k: v.detach().cpu().clone() for k, v in module.trainable_state_dict().items()},
                      str(folder / "trained.safetensors"))
            module.model.eval()
            fixed = unpack(next(iter(dm.val_dataloader())))
            device = module.device
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16-mixed"):
                logits = module.model(input_ids=fixed["input_ids"].to(device),
                                      attention_mask=fixed["attention_mask"].to(device)).logits.cpu()
            torch.save({"logits": logits, "input_ids": fixed["input_ids"], "attention_mask": fixed["attention_mask"]},
                       folder / "logits.pt")
            module.save_trained(folder / "artifact")
        if trainer.world_size > 1:
            dist.barrier()


if __name__ == "__main__":
    main()
