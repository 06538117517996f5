"""Resuming from a mid-epoch checkpoint ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from ftframe.data import InstructionDataModule
from ftframe.methods import LoRA
from ftframe.optim import OptimizerSettings
from tests.helpers import tiny_trainer


def _run(tiny_model, tiny_data, cache_dir, tmp_path, max_steps, ckpt_path=None, callbacks=()):
    seed_everything(7)
    module = LoRA(model_name=tiny_model, r=4, dropout=0.0, optimizer=OptimizerSettings(learning_rate=5e-3, warmup_steps=2))
    # 40 training examples / batch 4 = 10 batches per epoch; stopping at step 3 is mid-epoch
    data = InstructionDataModule(train_files=tiny_data, tokenizer=tiny_model, val_size=8, batch_size=4,
                                 cache_dir=cache_dir)
    trainer = tiny_trainer(tmp_path, max_steps=max_steps, callbacks=list(callbacks),
                           enable_checkpointing=bool(callbacks))
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer


class StopAt(Callback):
    """Simulates an interruption: the run is configured for the full length but stops after ``step`` steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def test_resume_mid_epoch_matches_uninterrupted(tiny_model, tiny_data, cache_dir, tmp_path):
    full, _ = _run(tiny_model, tiny_data, cache_dir, tmp_path / "a", max_steps=14)  # crosses an epoch boundary
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    _, stopped = _run(tiny_model, tiny_data, cache_dir, tmp_path / "b", max_steps=14, callbacks=[StopAt(3), ckpt_cb])
    assert stopped.global_step == 3
    ckpt = next((tmp_path / "ckpt").glob("*step=3*.ckpt"))
    resumed, trainer = _run(tiny_model, tiny_data, cache_dir, tmp_path / "c", max_steps=14, ckpt_path=str(ckpt))
    assert trainer.global_step == 14
    a, b = full.trainable_state_dict(), resumed.trainable_state_dict()
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
