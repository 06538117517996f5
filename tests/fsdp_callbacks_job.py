"""FSDP with ftframe's callbacks, for tests/test_distributed.py (run as a script so Lightning can start its ranks).

    python tests/fsdp_callbacks_job.py OUT MODEL DATA REFERENCE PROBE STRATEGY DEVICES BATCH STEPS [RESUME]

Trains LoRA for ``STEPS`` steps with ``AdapterCheckpoint`` (every 2 steps), ``ForgettingMonitor`` (reference windows and
a multiple-choice probe, measured before training and at the end) and ``AdapterExport`` into ``OUT``; ``STRATEGY`` is
``fsdp`` (Lightning's FSDPStrategy on CPU processes, see ``tests/ddp_job.py``), ``fsdp-sharded`` (the same, checkpoints
as folders of shards) or ``single``; ``BATCH`` examples per
process. ``RESUME``: a checkpoint
folder to continue from.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch import seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ftframe.callbacks import AdapterCheckpoint, AdapterExport, ForgettingMonitor  # noqa: E402
from ftframe.callbacks.adapter_checkpoint import resolve_resume_path  # noqa: E402
from ftframe.data import InstructionDataModule  # noqa: E402
from ftframe.methods import LoRA  # noqa: E402
from ftframe.optim import OptimizerSettings
from tests.ddp_job import make_strategy  # noqa: E402
from tests.helpers import tiny_trainer  # noqa: E402


def main() -> None:
    out, model, data, reference, probe, strategy, devices, batch, steps, *resume = sys.argv[1:]
    out_dir = Path(out)
    seed_everything(0)
    module = LoRA(model_name=model, optimizer=OptimizerSettings(learning_rate=1e-2), r=4, dropout=0.0)
    dm = InstructionDataModule(train_files=data, tokenizer=model, val_size=8, batch_size=int(batch),
                               cache_dir=str(out_dir / "cache"))
    callbacks = [AdapterCheckpoint(dirpath=str(out_dir / "checkpoints"), every_n_train_steps=2, monitor=None,
                                   save_top_k=-1),
                 ForgettingMonitor(reference=reference, reference_windows=3, window_tokens=24, probe=probe,
                                   probe_size=5, output_dir=str(out_dir / "forgetting")),
                 AdapterExport(dirpath=str(out_dir / "adapter"))]
    trainer = tiny_trainer(out_dir, max_steps=int(steps), devices=int(devices), callbacks=callbacks, enable_checkpointing=True,
                           strategy=make_strategy(strategy, int(devices), "32-true"),
                           precision=None if strategy.startswith("fsdp") else "32-true")
    trainer.fit(module, datamodule=dm, ckpt_path=resolve_resume_path(resume[0]) if resume else None)


if __name__ == "__main__":
    main()
