"""``FineTuneModule``: the one base class every adaptation method subclasses (docs/design.md).

It owns the Lightning plumbing -- building the model in ``configure_model``, the optimizer, logging, trainable-only
checkpoints, saving and loading the trained weights -- so that a method is a handful of lines.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, final

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ftframe import distributed as dist
from ftframe import models
from ftframe.artifacts import TrainedFolder, load_peft_adapter, merge_peft
from ftframe.efficiency import apply_levers, frozen_storage_dtype
from ftframe.errors import UserError
from ftframe.methods.variant import Variant
from ftframe.metrics import StageMetrics
from ftframe.optim import OptimizerSettings, configure_adamw
from ftframe.packing import STEP_TOKENS, batch_examples, enable_varlen_attention
from ftframe.tasks import CausalLM, Task

__all__ = ["DEFAULT_MODEL", "FineTuneModule", "Variant"]

DEFAULT_MODEL = "smollm2-135m-instruct"


class FineTuneModule(LightningModule):
    """Base of all fine-tuning methods (docs/design.md, "Adding a method").

    Subclasses override one or more of these hooks (and nothing else):

    * :meth:`peft_config` -- a ``peft`` config, applied with ``get_peft_model`` (most methods need only this: ``LoRA``);
    * :meth:`adapt` -- transform the loaded model yourself (methods ``peft`` lacks; default: apply :meth:`peft_config`,
      or train every parameter when it is ``None``);
    * :meth:`load_base_model` -- how the frozen base loads (``QLoRA``: 4-bit NF4); :meth:`check_base` -- refuse an
      unsuitable base from its config, before its weights load;
    * :meth:`save_trained` and its counterparts :meth:`load_trained` / :meth:`load_base` / :meth:`merge_trained` --
      what is written as the trained artifact and how every command loads (or merges) it again;
    * :meth:`disable_adapters` -- the untuned base without a second copy (the forgetting monitor's reference);
      :meth:`reference_context` -- the model as training started (the ``Preference`` task's reference).

    Trainable parameters are whatever has ``requires_grad`` after :meth:`adapt`; checkpoints hold only those (plus
    optimizer and loop state), never the frozen base. Non-finite steps are skipped by the ``NonFiniteGuard`` callback.

    Args:
        model_name: Base model: an asset name, a Hugging Face folder, a ``.gguf`` file or a hub id (the CLI links it
            to the data module's tokenizer).
        task: What is learned; defaults to causal-LM instruction tuning (loss on response tokens only).
        dtype: Storage dtype of the base weights. Use ``precision: bf16-mixed`` on the Trainer for mixed precision.
        optimizer: AdamW and its learning-rate schedule (:class:`ftframe.optim.OptimizerSettings`: ``learning_rate``,
            ``weight_decay``, ``betas``, ``warmup_steps``, ``lr_schedule``, ``min_lr_ratio``, ``fused``).
        gradient_checkpointing: Recompute activations in the backward pass to save memory (slower).
        frozen_dtype: Storage dtype of frozen linear weights; ``auto``: the 16-bit type of ``bf16-mixed`` / ``16-mixed``
            (same results, half the memory) where ``cast_frozen_weights``, else as loaded. Embeddings never change.
        lean_activations: Keep fewer activation copies for the backward pass, same results (docs/performance.md).
        neftune_alpha: NEFTune noise ``alpha / sqrt(length x hidden)`` on the input embeddings while training (Jain et
            al., 2023, https://arxiv.org/abs/2310.05914); ``null`` disables. Papers use 5-15.
        compile: ``torch.compile`` each transformer block (the first steps are slower while it compiles).
        init_adapter: A saved adapter folder (``ftframe fit``'s ``adapter/``, or any peft adapter of the same method
            and settings) whose weights this run starts from, e.g. preference tuning after instruction tuning. With the
            ``Preference`` task it also stays loaded, frozen, as the reference (an adapter's worth of memory, not a
            model's).
    """

    #: Frozen weights are used only in matmuls, so ``frozen_dtype: auto`` may store them in the autocast dtype (not
    #: DoRA's row norms or IA3's input scaling, which read them otherwise).
    cast_frozen_weights: bool = False
    #: Under FSDP, ranks > 0 may build the base on the ``meta`` device and receive rank 0's weights as FSDP wraps it
    #: (not for bases quantized while they load: QLoRA).
    meta_init: bool = True
    #: Set by ``configure_model``: this process built the model on the ``meta`` device (see :attr:`meta_init`).
    built_on_meta: bool = False
    #: The configurations ftframe's tests and ``ftframe compare`` run, by label (see :class:`Variant`).
    variants: ClassVar[dict[str, Variant]] = {}

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        task: Task | None = None,
        dtype: models.DTypeName = "float32",
        optimizer: OptimizerSettings = OptimizerSettings(),
        gradient_checkpointing: bool = False,
        frozen_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        lean_activations: bool = True,
        neftune_alpha: float | None = None,
        compile: bool = False,
        init_adapter: str | None = None,
    ) -> None:
        super().__init__()
        self.optimizer = replace(optimizer)  # (a copy: the default instance is shared)
        self.save_hyperparameters(ignore=["task", "optimizer"])
        self.hparams["optimizer"] = asdict(self.optimizer)  # plain values: checkpoints load with weights_only
        self.model_name = model_name
        self.task = task if task is not None else CausalLM()
        self.dtype_name = dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.frozen_dtype = frozen_dtype
        self.lean_activations = lean_activations
        self.compile_blocks = compile
        if neftune_alpha is not None and neftune_alpha <= 0:
            raise UserError(f"neftune_alpha must be > 0 or null, got {neftune_alpha}")
        self.neftune_alpha = neftune_alpha
        self.init_adapter = init_adapter
        self.reference_adapter: str | None = None  # name of the frozen starting adapter kept as a reference
        self.model: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self.strict_loading = False  # checkpoints hold trainable weights only: loading must not demand the base
        self.step_tokens: torch.Tensor | None = None  # supervised tokens of the last training batch
        self.eval_metrics: torch.nn.ModuleDict | None = None  # "val" / "test" -> StageMetrics, built with the model
        self.computed_metrics: dict[str, dict[str, torch.Tensor]] = {}  # last values by stage (confusion matrices too)

    def check_base(self, config: Any) -> None:
        """Refuse an unsuitable base from its config alone (before any weight loads): raise a :class:`UserError`
        saying why and what works instead. Default: accept every model."""

    def peft_config(self) -> Any:
        """Return a ``peft`` config to apply to the base model, or ``None`` to train the model as loaded."""
        return None

    def load_base_model(self) -> torch.nn.Module:
        """Load the base model for :attr:`task` from :attr:`model_name` (override to quantize or otherwise change it)."""
        return models.load_model(self.model_name, self.task.auto_class(), dtype=self.dtype_name, **self.task.model_kwargs())

    def adapt(self, model: torch.nn.Module) -> torch.nn.Module:
        """Turn the loaded base into the trainable model. Default: apply :meth:`peft_config` if it is not ``None``."""
        config = self.peft_config()
        if config is None:
            return model
        from peft import get_peft_model

        if getattr(config, "task_type", None) is None and self.task.peft_task_type:
            config.task_type = self.task.peft_task_type
        peft_model = get_peft_model(model, config)
        # record the name the user gave (asset, folder, hub id), not the resolved cache folder
        for cfg in peft_model.peft_config.values():
            cfg.base_model_name_or_path = self.model_name
        return peft_model

    def save_trained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write what training produced: a ``peft`` adapter folder, or the whole model if no peft config is used.
        ``state_dict``: the weights (keyed as ``self.state_dict()``) gathered from shards under FSDP / ZeRO-3."""
        self._save(self.model, str(directory), state_dict)

    def saves_trained_weights_only(self) -> bool:
        """Whether :meth:`save_trained` writes trained weights only (what a sharding strategy gathers for saving)."""
        return hasattr(self.model, "peft_config")

    def disable_adapters(self) -> AbstractContextManager[Any] | None:
        """A context in which :attr:`model` computes the untuned base's outputs, with no second copy; ``None`` when
        the method has none (full fine-tuning, PiSSA): the forgetting monitor then snapshots the initial weights."""
        from peft import PeftModel

        return self.model.disable_adapter() if isinstance(self.model, PeftModel) else None

    def reference_context(self) -> AbstractContextManager[Any] | None:
        """A context in which :attr:`model` computes what it computed before this run's training, with no second
        copy: the frozen starting adapter (``init_adapter``) switched in, or :meth:`disable_adapters`; ``None`` when
        there is no such switch (the ``Preference`` task then precomputes its reference log-probabilities)."""
        if self.reference_adapter is not None:
            return _use_adapter(self.model, self.reference_adapter)
        if self.init_adapter:
            return None  # switching the adapters off would give the base, not where this run started
        return self.disable_adapters()

    def _start_from_adapter(self, model: torch.nn.Module) -> torch.nn.Module:
        """Load ``init_adapter``'s weights into the freshly adapted ``model`` (and a frozen copy for the reference)."""
        from peft import PeftModel

        folder = Path(self.init_adapter)
        name = type(self).__name__
        if not isinstance(model, PeftModel):
            raise UserError(f"{name}: init_adapter needs a peft method (LoRA, DoRA, IA3, prompt learning...); "
                            f"{name} trains the model itself -- pass the trained model folder as model_name instead")
        if not (folder / "adapter_config.json").is_file():
            raise UserError(f"init_adapter: {folder} holds no adapter_config.json; point it at a saved adapter folder "
                            "(e.g. runs/quickstart/adapter)")
        weights = _adapter_weights(folder)
        saved = json.loads((folder / "adapter_config.json").read_text())
        mine = model.peft_config["default"].to_dict()
        differ = [f"{k}: {saved.get(k)!r} there, {mine.get(k)!r} here" for k in _SHAPE_KEYS
                  if k in saved and k in mine and _norm(saved[k]) != _norm(mine[k])]
        if differ:
            raise UserError(f"init_adapter: the adapter in {folder} was made with other settings than this {name} "
                            f"({'; '.join(differ)}); configure the method as the adapter was trained")
        wanted = getattr(self.task, "needs_reference_model", False)
        names = ["default", "reference"] if wanted else ["default"]
        if wanted:
            import copy

            model.add_adapter("reference", copy.deepcopy(model.peft_config["default"]))
        from peft import set_peft_model_state_dict

        for adapter in names:
            result = set_peft_model_state_dict(model, weights, adapter_name=adapter)
            missing = [k for k in getattr(result, "missing_keys", []) if f".{adapter}" in k]
            if missing:
                raise UserError(f"init_adapter: {folder} lacks {len(missing)} of this {name}'s adapter weights (e.g. "
                                f"{missing[0]}); it was trained with other target modules or another method")
        model.set_adapter("default")
        if wanted:
            for pname, p in model.named_parameters():
                if ".reference" in pname:
                    p.requires_grad_(False)
            self.reference_adapter = "reference"
        rank_zero_info(f"[ftframe] {name}: starting from the adapter in {folder}"
                       + (" (kept frozen as the reference)" if wanted else ""))
        return model

    @classmethod
    def load_base(cls, folder: TrainedFolder, name: str, dtype: models.DTypeName) -> torch.nn.Module:
        """The base model ``folder``'s adapter was trained on, as training saw it (``QLoRA``: 4-bit again)."""
        auto, kwargs = folder.auto_class()
        return models.load_model(name, auto, dtype=dtype, **kwargs)

    @classmethod
    def load_trained(cls, folder: TrainedFolder, model: str | None = None,
                     dtype: models.DTypeName = "float32") -> torch.nn.Module:
        """Rebuild what :meth:`save_trained` wrote: the base (:meth:`load_base`; ``model``: another name for it) with
        the peft adapter on top, or the whole model. The counterpart every command loads trained folders through."""
        if not folder.is_peft:
            auto, kwargs = folder.auto_class()
            return models.load_model(str(folder.path), auto, dtype=dtype, **kwargs)
        name = folder.base_name(model)
        return load_peft_adapter(cls.load_base(folder, name, dtype), folder.path, name)

    @classmethod
    def merge_trained(cls, folder: TrainedFolder, model: str | None = None) -> tuple[torch.nn.Module, str]:
        """The trained model as one plain transformers model in float32 (the update folded into the base weights),
        and a note saying how. Methods whose update is not a weight change raise :class:`UserError` saying why."""
        loaded = cls.load_trained(folder, model, "float32")
        if not folder.is_peft:
            return loaded, "a full model folder: nothing to merge, weights rewritten in the chosen dtype"
        return merge_peft(loaded, folder.path), "merged in float32"

    def _save(self, model: torch.nn.Module, directory: str, state_dict: dict[str, torch.Tensor] | None = None,
              **extra: Any) -> None:
        offline = models.resolve_model(self.model_name) != self.model_name
        if self.reference_adapter is not None:  # the frozen starting copy is not part of what was trained
            extra.setdefault("selected_adapters", ["default"])
        dist.save_pretrained(model, directory, state_dict, offline=offline, **extra)

    @final
    def configure_model(self) -> None:
        if self.model is not None:  # fit -> validate reuse the same model; Lightning may call this more than once
            return
        from transformers import AutoConfig

        self.tokenizer = models.load_tokenizer(self.model_name)
        self.task.bind(getattr(self._trainer, "datamodule", None) if self._trainer is not None else None)
        config = AutoConfig.from_pretrained(models.resolve_model(self.model_name), **self.task.model_kwargs())
        self.check_base(config)  # before any weight is loaded
        skeleton = lambda: self.task.auto_class().from_config(config, dtype=models.DTYPES[self.dtype_name])  # noqa: E731
        targets = getattr(self.peft_config(), "target_modules", None)
        if isinstance(targets, (list, set)):  # module names come from the architecture: a weightless skeleton has them
            with torch.device("meta"):
                models.check_target_modules(skeleton(), targets, type(self).__name__)
        # FSDP rank > 0: the skeleton on the meta device; ZeRO-3: loaded into the partitions (switch kept for the run)
        model, self.built_on_meta, self._hf_deepspeed = dist.build_model(self._trainer, self.meta_init, skeleton,
                                                                         self.load_base_model)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        enable_varlen_attention(model)  # identical to sdpa, and keeps packed examples apart
        model = self.adapt(model).train()  # from_pretrained returns eval mode; dropout etc. must be on in training
        if self.init_adapter:
            model = self._start_from_adapter(model)
        self.task.check_model(model, type(self).__name__)
        head = self.task.head(model)
        if self.task.new_head and head is not None and not hasattr(model, "peft_config"):
            head.requires_grad_(True)  # a freshly initialized head must learn (peft methods: modules_to_save does it)
        frozen = frozen_storage_dtype(self.frozen_dtype, self.cast_frozen_weights,
                                      getattr(self._trainer, "precision", None), dist.shards_parameters(self._trainer))
        apply_levers(model, frozen, self.lean_activations, self.neftune_alpha, self.compile_blocks,
                     self.gradient_checkpointing)
        dist.mark_tied_parameters(model)  # for FSDP's wrapping policy: shared weights stay in one unit
        if self.built_on_meta:
            dist.prepare_meta_init(self._trainer, model)  # FSDP fills meta modules one by one, tied weights kept tied
        self.model = model
        self.task.attach(self)
        self.eval_metrics = torch.nn.ModuleDict({"val": StageMetrics(self.task), "test": StageMetrics(self.task)})
        trainable, total = self.parameter_counts()
        if trainable == 0:
            raise UserError(f"{type(self).__name__} left no trainable parameters; check its options")
        rank_zero_info(f"[ftframe] {type(self).__name__}: {trainable:,} trainable of {total:,} parameters "
                   f"({100 * trainable / total:.3f}%)")

    @final
    def parameter_counts(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts of the built model."""
        assert self.model is not None
        params = {id(p): p for p in self.model.parameters()}.values()  # tied weights counted once
        return sum(p.numel() for p in params if p.requires_grad), sum(models.logical_numel(p) for p in params)

    @final
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable parameters, keyed as in ``self.state_dict()``."""
        names = dist.trainable_names(self)
        return {k: v for k, v in self.state_dict().items() if k in names}

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    @final
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, self.step_tokens = self.task.loss(self.model, batch)  # (NonFiniteGuard checks both)
        step_loss, tokens = loss, self.step_tokens.float()
        if self.task.token_weighted:
            loss, step_loss, tokens = self._token_mean(loss, batch)
        if bool(torch.isfinite(loss)):
            bs = batch_examples(batch)
            if step_loss is not None:
                self.log("train/loss", step_loss, prog_bar=True, batch_size=bs)
            if tokens is not None:  # the optimizer step's supervised tokens, on all processes
                self.log("train/tokens", tokens, reduce_fx="sum", batch_size=bs)
            for name, value in self.task.train_logs().items():  # task statistics (Preference: rewards), all processes
                self.log(f"train/{name}", value, batch_size=bs, sync_dist=True)
        else:
            self._step_loss = None
        return loss

    def _token_mean(self, loss: torch.Tensor, batch: dict[str, Any]
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """What to back-propagate so that the optimizer step's gradient is that of the mean loss over every supervised
        token of its micro-batches on all processes, and (on the step's last micro-batch) that mean and that token
        count, else ``None`` twice.

        Lightning divides the returned loss by ``accumulate_grad_batches`` and DDP / FSDP average gradients over the
        processes; this micro-batch's share ``sum of its token losses / tokens of the whole step`` is multiplied by both
        to undo that (docs/distributed.md, "One step, one token mean")."""
        trainer = self._trainer
        world = int(trainer.world_size) if trainer is not None else 1
        accumulate = int(trainer.accumulate_grad_batches) if trainer is not None else 1
        local = batch.get(STEP_TOKENS) if isinstance(batch, dict) else None
        if local is None:  # a data module without StepWindows: exact over processes, not over accumulated batches
            if accumulate > 1 and not getattr(self, "_warned_windows", False):
                self._warned_windows = True
                rank_zero_warn("[ftframe] the training batches carry no step token count (wrap the train loader in "
                               "ftframe.data.collate.StepWindows): the micro-batches of an accumulated step weigh "
                               "equally instead of by their supervised tokens")
            local, accumulate = self.step_tokens, 1
        step_tokens = dist.sum_over_ranks(trainer, local.to(loss.device, torch.float32))
        share = loss * self.step_tokens / step_tokens.clamp(min=1)
        done = getattr(self, "_step_loss", None)
        self._step_loss = share.detach() if done is None else done + share.detach()
        stepping = trainer is None or not trainer.fit_loop._should_accumulate()
        step_loss = None
        if stepping:
            step_loss, self._step_loss = dist.sum_over_ranks(trainer, self._step_loss), None
        return share * (accumulate * world), step_loss, step_tokens if stepping else None

    def on_fit_start(self) -> None:
        self.task.on_fit_start(self)  # (after a resumed checkpoint was restored)

    # fresh state in the current grad mode (one made under ``trainer.validate``'s inference mode cannot be updated)
    def on_validation_epoch_start(self) -> None:
        self.eval_metrics["val"].reset()

    def on_test_epoch_start(self) -> None:
        self.eval_metrics["test"].reset()

    @final
    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    @final
    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Updates the test loss and metrics; returns per-example records for error-analysis callbacks."""
        outputs = self._eval_step("test", batch, dataloader_idx)
        return self.task.examples(batch, outputs) if outputs is not None else []

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _eval_step(self, stage: str, batch: dict[str, Any], dataloader_idx: int) -> Any:
        loss, weight, outputs = self.task.evaluate(self.model, batch)
        names = getattr(getattr(self._trainer, "datamodule", None), "dataset_names", None) if self._trainer else None
        self.eval_metrics[stage].update(loss, weight, outputs, names[dataloader_idx] if names and len(names) > 1
                                        else None)
        return outputs

    def _log_eval(self, stage: str) -> None:
        if not self.trainer.sanity_checking:
            self.computed_metrics.update(self.eval_metrics[stage].log(self, stage))

    @final
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        return self.task.predict(self.model, batch, self.tokenizer)

    def configure_optimizers(self) -> Any:
        return configure_adamw(self.parameters(), self.optimizer, self.trainer.estimated_stepping_batches)

    @final
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # trainable weights only (the base reloads from model_name), except in a sharded FSDP checkpoint, where
        # torch.distributed.checkpoint restores every key of the model
        strategy = getattr(self._trainer, "strategy", None) if self._trainer is not None else None
        if getattr(strategy, "_state_dict_type", "full") == "sharded":
            return
        names = dist.trainable_names(self)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in names}
        task_state = self.task.state_dict()
        if task_state:
            checkpoint["ftframe_task"] = task_state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("ftframe_task"):
            self.task.load_state_dict(checkpoint["ftframe_task"])


#: peft config fields that decide the adapter's weight shapes and placement (compared for ``init_adapter``).
_SHAPE_KEYS = ("peft_type", "r", "target_modules", "use_dora", "num_virtual_tokens", "token_dim", "num_layers",
               "encoder_hidden_size", "feedforward_modules", "modules_to_save")


def _norm(value: Any) -> Any:
    return sorted(value) if isinstance(value, (list, set, tuple)) else value


def _adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = folder / "adapter_model.safetensors"
    if path.is_file():
        return load_file(str(path))
    legacy = folder / "adapter_model.bin"
    if legacy.is_file():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise UserError(f"init_adapter: {folder} holds no adapter_model.safetensors")


@contextmanager
def _use_adapter(model: Any, name: str) -> Iterator[None]:
    """Compute with adapter ``name`` instead of the active one; peft's ``set_adapter`` also changes which parameters
    require gradients, which is put back exactly."""
    previous = model.active_adapter
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for n, p in model.named_parameters():
            if p.requires_grad != grads[n]:
                p.requires_grad_(grads[n])
