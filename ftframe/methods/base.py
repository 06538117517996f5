"""``FineTuneModule``: the one base class every adaptation method subclasses (docs/design.md).

It owns the Lightning plumbing -- building the model in ``configure_model``, the optimizer, logging, trainable-only
checkpoints, saving and loading the trained weights -- so that a method is a handful of lines.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar, Literal, final

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info

from ftframe.artifacts import TrainedFolder, load_peft_adapter, merge_peft
from ftframe.distributed import (
    build_model,
    mark_tied_parameters,
    prepare_meta_init,
    save_pretrained,
    shards_parameters,
    trainable_names,
)
from ftframe.efficiency import apply_levers, frozen_storage_dtype
from ftframe.errors import UserError
from ftframe.methods.variant import Variant
from ftframe.metrics import StageMetrics
from ftframe.models import (
    DTYPES,
    DTypeName,
    check_target_modules,
    load_model,
    load_tokenizer,
    logical_numel,
    resolve_model,
)
from ftframe.optim import OptimizerSettings, configure_adamw
from ftframe.packing import batch_examples, enable_varlen_attention
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
    * :meth:`disable_adapters` -- the untuned base without a second copy (the forgetting monitor's reference).

    Trainable parameters are whatever has ``requires_grad`` after :meth:`adapt`; checkpoints hold only those (plus
    optimizer and loop state), never the frozen base. Non-finite steps are skipped by the ``NonFiniteGuard`` callback.

    Args:
        model_name: Base model: an asset name (see ``ftframe download``), a local Hugging Face folder, a ``.gguf``
            file, or a hub id. The data module's tokenizer is linked to this value by the CLI.
        task: What is learned; defaults to causal-LM instruction tuning (loss on response tokens only).
        dtype: Storage dtype of the base weights. Use ``precision: bf16-mixed`` on the Trainer for mixed precision.
        learning_rate: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay, applied to matrices only (biases and norm weights are excluded).
        betas: AdamW betas.
        warmup_steps: Linear warm-up length: optimizer steps if >= 1, else a fraction of all training steps.
        lr_schedule: Shape of the LR after warm-up.
        min_lr_ratio: Final LR as a fraction of the peak for the cosine schedule.
        gradient_checkpointing: Recompute activations in the backward pass to save memory (slower).
        frozen_dtype: Storage dtype of frozen linear weights. ``auto``: under ``bf16-mixed`` / ``16-mixed``, the 16-bit
            type autocast computes them in anyway (same results, half the memory) for methods that use frozen weights
            only in matmuls (``cast_frozen_weights``); as loaded otherwise. Embeddings and trained weights never change.
        lean_activations: Keep fewer activation copies for the backward pass, with identical results (shared 16-bit
            input copies, ``silu(gate)`` recomputed, vanilla LoRA fused outside autocast; docs/performance.md).
        fused_optimizer: Use PyTorch's fused AdamW kernel (one kernel for all parameters; same update).
        neftune_alpha: NEFTune noise ``alpha / sqrt(length x hidden)`` on the input embeddings while training (Jain et
            al., 2023, https://arxiv.org/abs/2310.05914); ``null`` disables. Papers use 5-15.
        compile: ``torch.compile`` each transformer block (the first steps are slower while it compiles).
    """

    #: Whether frozen weights are used only in matmuls, so that ``frozen_dtype: auto`` may store them in the
    #: autocast dtype without changing results. Methods that read frozen weights otherwise (DoRA's row norms, IA3's
    #: input scaling) leave it ``False``.
    cast_frozen_weights: bool = False
    #: Whether, under FSDP with several processes, ranks other than 0 may build the base on the ``meta`` device (no
    #: weights read, no memory) and receive rank 0's weights as FSDP wraps the model. ``False`` for bases that are
    #: quantized while they load (QLoRA), which every rank loads itself.
    meta_init: bool = True
    #: Set by ``configure_model``: this process built the model on the ``meta`` device (see :attr:`meta_init`).
    built_on_meta: bool = False
    #: The configurations ftframe's tests and ``ftframe compare`` run, by label (see :class:`Variant`).
    variants: ClassVar[dict[str, Variant]] = {}

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        task: Task | None = None,
        dtype: DTypeName = "float32",
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: float = 0.0,
        lr_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        min_lr_ratio: float = 0.0,
        gradient_checkpointing: bool = False,
        frozen_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        lean_activations: bool = True,
        fused_optimizer: bool = True,
        neftune_alpha: float | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.optimizer = OptimizerSettings(learning_rate, weight_decay, betas, warmup_steps, lr_schedule, min_lr_ratio,
                                           fused_optimizer)
        self.save_hyperparameters(ignore=["task"])
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
        self.step_tokens: torch.Tensor | None = None  # supervised tokens of the last training batch
        self.model: torch.nn.Module | None = None
        self.tokenizer: Any = None
        # Checkpoints hold trainable weights only, so loading them must not demand the frozen base.
        self.strict_loading = False
        self._hf_deepspeed: Any = None  # transformers' ZeRO-3 loading switch, alive for the run (see configure_model)
        self.eval_metrics: torch.nn.ModuleDict | None = None  # "val" / "test" -> StageMetrics, built with the model
        #: the last computed ``{"val": ..., "test": ...}`` metric values, tensors included (confusion matrices)
        self.computed_metrics: dict[str, dict[str, torch.Tensor]] = {}

    def check_base(self, config: Any) -> None:
        """Refuse a base model this method cannot work with, from its config alone (before any weight loads).

        Raise :class:`ftframe.errors.UserError` saying why and what works instead. Default: accept every model.
        """

    def peft_config(self) -> Any:
        """Return a ``peft`` config to apply to the base model, or ``None`` to train the model as loaded."""
        return None

    def load_base_model(self) -> torch.nn.Module:
        """Load the base model for :attr:`task` from :attr:`model_name` (override to quantize or otherwise change it)."""
        return load_model(self.model_name, self.task.auto_class(), dtype=self.dtype_name, **self.task.model_kwargs())

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

        ``state_dict``: the weights to write, keyed as in ``self.state_dict()``, when the module's own parameters are
        shards (FSDP, ZeRO-3: gathered by :func:`ftframe.artifacts.gather_trained`); ``None`` reads the module.
        """
        assert self.model is not None, "configure_model() has not run"
        self._save(self.model, str(directory), state_dict)

    def saves_trained_weights_only(self) -> bool:
        """Whether :meth:`save_trained` writes trained weights only (an adapter) rather than the whole model.

        Under a sharding strategy this decides what is gathered onto rank 0 for saving: the trainable weights, or
        every weight. Default: only a ``peft`` model's artifact is an adapter.
        """
        return hasattr(self.model, "peft_config")

    def disable_adapters(self) -> AbstractContextManager[Any] | None:
        """A context in which :attr:`model` computes the untuned base model's outputs, with no second copy in memory.

        Return ``None`` when the method has no such switch (full fine-tuning trains the base itself; PiSSA-style
        initializations change the base weights): the forgetting monitor then compares against a snapshot of the
        initial trainable weights instead. Default: peft's ``disable_adapter()`` on a peft model.
        """
        from peft import PeftModel

        return self.model.disable_adapter() if isinstance(self.model, PeftModel) else None

    @classmethod
    def load_base(cls, folder: TrainedFolder, name: str, dtype: DTypeName) -> torch.nn.Module:
        """The base model ``folder``'s adapter was trained on, as training saw it (``QLoRA``: 4-bit again)."""
        auto, kwargs = folder.auto_class()
        return load_model(name, auto, dtype=dtype, **kwargs)

    @classmethod
    def load_trained(cls, folder: TrainedFolder, model: str | None = None,
                     dtype: DTypeName = "float32") -> torch.nn.Module:
        """Rebuild what :meth:`save_trained` wrote: the base (:meth:`load_base`; ``model``: another name for it) with
        the peft adapter on top, or the whole model. The counterpart every command loads trained folders through."""
        if not folder.is_peft:
            auto, kwargs = folder.auto_class()
            return load_model(str(folder.path), auto, dtype=dtype, **kwargs)
        name = model or folder.base
        if not name:
            raise UserError(f"no base model recorded in {folder.path}; pass --model")
        return load_peft_adapter(cls.load_base(folder, name, dtype), folder.path, name)

    @classmethod
    def merge_trained(cls, folder: TrainedFolder, model: str | None = None) -> tuple[torch.nn.Module, str]:
        """The trained model as one plain transformers model in float32 (the update folded into the base weights),
        and a note saying how. Methods whose update is not a weight change raise :class:`UserError` saying why."""
        loaded = cls.load_trained(folder, model, "float32")
        if not folder.is_peft:
            return loaded, "a full model folder: nothing to merge, weights rewritten in the chosen dtype"
        if loaded.peft_config["default"].is_prompt_learning:
            raise UserError(f"{folder.path} is a {folder.peft_config['peft_type']} adapter: it learns virtual tokens "
                            "(or per-layer key/value prefixes) fed with every input, not a change to the base's "
                            "weights, so it cannot be merged. Use it with `ftframe generate --adapter`, or train a "
                            "weight-adapting method (LoRA, DoRA, IA3) to get a plain merged model")
        return merge_peft(loaded, folder.path), "merged in float32"

    def _save(self, model: torch.nn.Module, directory: str, state_dict: dict[str, torch.Tensor] | None = None,
              **extra: Any) -> None:
        save_pretrained(model, directory, state_dict, offline=resolve_model(self.model_name) != self.model_name, **extra)

    @final
    def configure_model(self) -> None:
        if self.model is not None:  # fit -> validate reuse the same model; Lightning may call this more than once
            return
        self.tokenizer = load_tokenizer(self.model_name)
        from transformers import AutoConfig

        self.task.bind(getattr(self._trainer, "datamodule", None) if self._trainer is not None else None)
        config = AutoConfig.from_pretrained(resolve_model(self.model_name), **self.task.model_kwargs())
        self.check_base(config)  # before any weight is loaded
        peft_config = self.peft_config()
        if isinstance(getattr(peft_config, "target_modules", None), (list, set)):
            # module names come from the architecture alone: check them on a weightless (meta) skeleton
            with torch.device("meta"):
                skeleton = self.task.auto_class().from_config(config)
            check_target_modules(skeleton, peft_config.target_modules, type(self).__name__)
        # FSDP, rank > 0: the architecture alone on the meta device (rank 0's weights arrive as FSDP wraps it);
        # DeepSpeed ZeRO-3: transformers loads into the partitions (its switch is kept alive for the run)
        model, self.built_on_meta, self._hf_deepspeed = build_model(
            self._trainer, self.meta_init, lambda: self.task.auto_class().from_config(config, dtype=DTYPES[self.dtype_name]),
            self.load_base_model)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        enable_varlen_attention(model)  # identical to sdpa, and keeps packed examples apart
        model = self.adapt(model).train()  # from_pretrained returns eval mode; dropout etc. must be on in training
        self.task.check_model(model, type(self).__name__)
        head = self.task.head(model)
        if self.task.new_head and head is not None and not hasattr(model, "peft_config"):
            head.requires_grad_(True)  # a freshly initialized head must learn (peft methods: modules_to_save does it)
        sharded = shards_parameters(self._trainer)  # FSDP / ZeRO-3 cast each unit's weights themselves
        frozen = frozen_storage_dtype(self.frozen_dtype, self.cast_frozen_weights, getattr(self._trainer, "precision",
                                      None), sharded)
        apply_levers(model, frozen, self.lean_activations, self.neftune_alpha, self.compile_blocks,
                     self.gradient_checkpointing)
        mark_tied_parameters(model)  # for FSDP's wrapping policy: shared weights stay in one unit
        if self.built_on_meta:
            prepare_meta_init(self._trainer, model)  # FSDP fills meta modules one by one, tied weights kept tied
        self.model = model
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
        return sum(p.numel() for p in params if p.requires_grad), sum(logical_numel(p) for p in params)

    @final
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable parameters, keyed as in ``self.state_dict()``."""
        names = trainable_names(self)
        return {k: v for k, v in self.state_dict().items() if k in names}

    def forward(self, **batch: torch.Tensor) -> Any:
        assert self.model is not None
        return self.model(**batch)

    @final
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        assert self.model is not None
        loss, self.step_tokens = self.task.loss(self.model, batch)  # (NonFiniteGuard checks both)
        if bool(torch.isfinite(loss)):
            bs = batch_examples(batch)
            self.log("train/loss", loss, prog_bar=True, batch_size=bs)
            self.log("train/tokens", self.step_tokens.float(), reduce_fx="sum", batch_size=bs)
        return loss

    # fresh state in the current grad mode: a state created under ``trainer.validate``'s inference mode cannot be
    # updated by the validation that runs inside ``fit`` (e.g. validate_before_fit, then a sanity check)
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
        assert self.model is not None
        loss, weight, outputs = self.task.evaluate(self.model, batch)
        names = getattr(getattr(self._trainer, "datamodule", None), "dataset_names", None) if self._trainer else None
        self.eval_metrics[stage].update(loss, weight, outputs, names[dataloader_idx] if names and len(names) > 1
                                        else None)
        return outputs

    def _log_eval(self, stage: str) -> None:
        if not self.trainer.sanity_checking:
            logged, computed = self.eval_metrics[stage].compute(stage)
            self.computed_metrics.update(computed)
            if f"{stage}/loss" in logged:
                self.log(f"{stage}/loss", logged.pop(f"{stage}/loss"), prog_bar=stage == "val", sync_dist=False)
            self.log_dict(logged, sync_dist=False)  # reduced over all ranks by torchmetrics already

    @final
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        assert self.model is not None
        return self.task.predict(self.model, batch, self.tokenizer)

    def configure_optimizers(self) -> Any:
        return configure_adamw(self.parameters(), self.optimizer, self.trainer.estimated_stepping_batches)

    @final
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # keep trainable weights only: the frozen base is reloaded from model_name on resume. A sharded FSDP
        # checkpoint is the exception: torch.distributed.checkpoint restores every key of the model, frozen included
        strategy = getattr(self._trainer, "strategy", None) if self._trainer is not None else None
        if getattr(strategy, "_state_dict_type", "full") == "sharded":
            return
        names = trainable_names(self)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in names}
