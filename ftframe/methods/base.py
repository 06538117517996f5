"""``FineTuneModule``: the one base class every adaptation method subclasses.

It owns the Lightning plumbing (building the model in ``configure_model``, the optimizer and LR schedule, logging,
trainable-only checkpoints, saving the trained weights) so that a method is a handful of lines. See
``docs/methods.md`` for a worked example of adding one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Literal, final

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric

from ftframe.distributed import (
    PROMPT_EMBEDDINGS,
    clean_name,
    mark_tied_parameters,
    shards_parameters,
    trainable_names,
)
from ftframe.efficiency import cast_frozen_linear, compile_blocks, lean_activations, own_mapped_weights
from ftframe.errors import UserError
from ftframe.models import DTYPES, DTypeName, load_model, load_tokenizer, resolve_model
from ftframe.packing import batch_examples, enable_varlen_attention, token_lengths
from ftframe.tasks import CausalLM, Task

__all__ = ["DEFAULT_MODEL", "FineTuneModule"]

DEFAULT_MODEL = "smollm2-135m-instruct"


class FineTuneModule(LightningModule):
    """Base of all fine-tuning methods.

    Subclasses override one or more of these hooks (and nothing else):

    * :meth:`peft_config` -- return a ``peft`` config; the base applies it with ``get_peft_model``
      (most methods need only this: see ``LoRA``).
    * :meth:`adapt` -- transform the loaded model yourself (methods ``peft`` lacks; the default applies
      :meth:`peft_config` or, when that is ``None``, trains every parameter).
    * :meth:`load_base_model` -- change how the frozen base is loaded (``QLoRA``: 4-bit NF4 via bitsandbytes).
    * :meth:`check_base` -- refuse an unsuitable base model from its config, before its weights load.
    * :meth:`save_trained` -- change what is written as the trained artifact (default: the peft adapter folder,
      or the whole model when no peft config is used).
    * :meth:`disable_adapters` -- a switch back to the untuned base without a second copy (the forgetting monitor's
      KL reference); default: peft's ``disable_adapter()``.

    Trainable parameters are whatever has ``requires_grad`` after :meth:`adapt`; checkpoints hold only those (plus
    optimizer and loop state), never the frozen base.

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
        frozen_dtype: Storage dtype of frozen linear weights. ``auto``: under ``bf16-mixed`` / ``16-mixed`` precision,
            the 16-bit type autocast computes them in anyway -- same results, half the memory, no per-step casts --
            for methods that use frozen weights only in matmuls (``cast_frozen_weights``: LoRA, LastLayers,
            BottleneckAdapters); as loaded otherwise. Embeddings (and a head tied to them) and trainable weights are
            never converted.
        lean_activations: Keep fewer activation copies for the backward pass, with identical results: under mixed
            precision, layers reading the same input share one 16-bit copy of it and LoRA branches skip peft's exact
            fp32 round trip of 16-bit inputs; the SwiGLU MLP recomputes ``silu(gate)`` instead of keeping it; outside
            autocast, vanilla LoRA layers run as one fused function (fewer full-width passes; equal to rounding).
        fused_optimizer: Use PyTorch's fused AdamW kernel (one kernel for all parameters; same update).
        neftune_alpha: NEFTune: add uniform noise of size ``alpha / sqrt(length x hidden)`` to the input embeddings while
            training (Jain et al., 2023, https://arxiv.org/abs/2310.05914; ``length`` is each example's own length in
            packed batches, the padded length otherwise); ``null`` disables. Papers use 5-15.
        compile: ``torch.compile`` each transformer block (fuses elementwise work; the first steps are slower while
            it compiles).
        max_nonfinite_steps: A step whose loss or gradients are not finite (inf / NaN) is skipped -- the weights and
            optimizer state stay as they were -- with a warning naming the batch's examples; after this many such
            steps training stops with an error, and the last checkpoint (written before them) is kept. ``0`` stops
            at the first one.
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
        max_nonfinite_steps: int = 10,
    ) -> None:
        super().__init__()
        if learning_rate <= 0:
            raise UserError(f"learning_rate must be > 0, got {learning_rate}")
        if warmup_steps < 0:
            raise UserError(f"warmup_steps must be >= 0 (steps, or a fraction < 1 of all steps), got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise UserError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.save_hyperparameters(ignore=["task"])
        self.model_name = model_name
        self.task = task if task is not None else CausalLM()
        self.dtype_name = dtype
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.warmup_steps = warmup_steps
        self.lr_schedule = lr_schedule
        self.min_lr_ratio = min_lr_ratio
        self.gradient_checkpointing = gradient_checkpointing
        self.frozen_dtype = frozen_dtype
        self.fused_optimizer = fused_optimizer
        self.lean_activations = lean_activations
        self.compile_blocks = compile
        if neftune_alpha is not None and neftune_alpha <= 0:
            raise UserError(f"neftune_alpha must be > 0 or null, got {neftune_alpha}")
        self.neftune_alpha = neftune_alpha
        if max_nonfinite_steps < 0:
            raise UserError(f"max_nonfinite_steps must be >= 0, got {max_nonfinite_steps}")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_steps = 0  # steps skipped for a non-finite loss or gradients in this run
        self._skip_step = False  # the step being accumulated had a non-finite loss
        self._step_ids: list[Any] = []  # the examples of the step being accumulated
        self.model: torch.nn.Module | None = None
        self.tokenizer: Any = None
        # Checkpoints hold trainable weights only, so loading them must not demand the frozen base.
        self.strict_loading = False
        self._hf_deepspeed: Any = None  # transformers' ZeRO-3 loading switch, alive for the run (see configure_model)
        self.val_loss = MeanMetric()
        self.val_metrics: Any = None  # the task's metrics (e.g. accuracy, F1), built with the model
        self.test_metrics: Any = None
        #: the last computed ``{"val": ..., "test": ...}`` metric values, tensors included (confusion matrices)
        self.computed_metrics: dict[str, dict[str, torch.Tensor]] = {}
        self._member_loss = torch.nn.ModuleDict()  # "<stage>__<data set>" -> MeanMetric (several data sets)
        self._member_metrics = torch.nn.ModuleDict()

    # ------------------------------------------------------------------ hooks for subclasses
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
        self._save(self.model, str(directory), **_weights_kwargs(state_dict))

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

    def _save(self, model: torch.nn.Module, directory: str, **kwargs: Any) -> None:
        """``model.save_pretrained`` in safetensors, with the hub switched off when the base is local."""
        prompt = kwargs.get("state_dict", {}).pop(PROMPT_EMBEDDINGS, None)
        gathered = "state_dict" in kwargs and hasattr(model, "peft_config")
        if gathered:
            # peft picks an adapter's entries by the module names it walks, which under FSDP hold the wrappers'
            # parts: name the gathered tensors that way, and take the parts out of the written file again
            # (a module wrapped alone -- "lora_A.default._fsdp_wrapped_module.weight" -- keeps its own part clean:
            # peft takes the adapter name out of the last two parts of a key)
            wrapped = {clean_name(n): _unwrap_leaf(n) for n, _ in model.named_parameters(remove_duplicate=False)}
            kwargs["state_dict"] = {wrapped.get(k, k): v for k, v in kwargs["state_dict"].items()}
        with _env(HF_HUB_OFFLINE="1") if resolve_model(self.model_name) != self.model_name else nullcontext():
            # (a local base -- asset, folder, gguf: peft must not look its name up on the hub while saving)
            if prompt is None:
                model.save_pretrained(directory, safe_serialization=True, **kwargs)
                if gathered:
                    _clean_saved_names(Path(directory))
                return
            # prompt learning under sharding: peft would run the prompt encoder here, on rank 0 alone, where the
            # encoder's weights are shards; its output was computed by every rank beforehand (gather_trained)
            original = model.get_prompt_embedding_to_save
            model.get_prompt_embedding_to_save = lambda adapter_name: prompt
            try:
                model.save_pretrained(directory, safe_serialization=True, **kwargs)
            finally:
                model.get_prompt_embedding_to_save = original

    # ------------------------------------------------------------------ plumbing
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
            _check_target_modules(skeleton, peft_config, type(self).__name__)
        if self._meta_init_here():
            # FSDP, rank > 0: the architecture alone; rank 0 reads the weights and FSDP broadcasts them while it wraps
            # the model (sync_module_states), materializing these modules on the device first (param_init_fn)
            with torch.device("meta"):
                model = self.task.auto_class().from_config(config, dtype=DTYPES[self.dtype_name])
            self.built_on_meta = True
        else:
            # DeepSpeed ZeRO-3 builds the model inside deepspeed.zero.Init, which partitions each weight as it is
            # created: transformers must know, to load checkpoint weights into the partitions (kept for the run)
            self._hf_deepspeed = _zero3_loading_config(self._trainer)
            model = self.load_base_model()
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        enable_varlen_attention(model)  # identical to sdpa, and keeps packed examples apart
        model = self.adapt(model).train()  # from_pretrained returns eval mode; dropout etc. must be on in training
        self.task.check_model(model, type(self).__name__)
        head = self.task.head(model)
        if self.task.new_head and head is not None and not hasattr(model, "peft_config"):
            head.requires_grad_(True)  # a freshly initialized head must learn (peft methods: modules_to_save does it)
        dtype = self._frozen_dtype()
        if dtype is not None and cast_frozen_linear(model, dtype):
            own_mapped_weights(model)  # else the few fp32 weights left would keep the whole checkpoint file resident
        if self.lean_activations:
            lean_activations(model)
        if self.neftune_alpha is not None:
            add_neftune(model, self.neftune_alpha)
        if self.compile_blocks:
            compile_blocks(model)
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        mark_tied_parameters(model)  # for FSDP's wrapping policy: shared weights stay in one unit
        if self.built_on_meta:
            # FSDP fills meta modules one by one; tied weights must become one tensor again (see _materialize)
            users: dict[int, list[tuple[torch.nn.Module, str]]] = {}
            for module in model.modules():
                for name, param in module.named_parameters(recurse=False):
                    users.setdefault(id(param), []).append((module, name))
            tied = {key: holders for key, holders in users.items() if len(holders) > 1}
            self._trainer.strategy.kwargs["param_init_fn"] = partial(
                _materialize, device=self._trainer.strategy.root_device, tied=tied)
        self.model = model
        metrics = self.task.metrics()
        if metrics is not None:
            self.val_metrics, self.test_metrics = metrics.clone(), metrics.clone()
        trainable, total = self.parameter_counts()
        if trainable == 0:
            raise UserError(f"{type(self).__name__} left no trainable parameters; check its options")
        rank_zero_info(f"[ftframe] {type(self).__name__}: {trainable:,} trainable of {total:,} parameters "
                   f"({100 * trainable / total:.3f}%)")

    def _meta_init_here(self) -> bool:
        """Whether this process builds the model on the meta device (and, on every rank, tell FSDP how to fill it)."""
        trainer = self._trainer
        if not (self.meta_init and trainer is not None and trainer.world_size > 1
                and "FSDPStrategy" in {t.__name__ for t in type(trainer.strategy).__mro__}):
            return False
        trainer.strategy.kwargs.setdefault("sync_module_states", True)  # rank 0's weights to every rank
        return trainer.global_rank != 0

    def _frozen_dtype(self) -> torch.dtype | None:
        if self.frozen_dtype == "auto" and not self.cast_frozen_weights:
            return None
        if self.frozen_dtype != "auto":
            return getattr(torch, self.frozen_dtype) if self.frozen_dtype != "float32" else None
        trainer = self._trainer
        if shards_parameters(trainer):
            return None  # FSDP / ZeRO-3 cast each unit's weights themselves; a flat parameter needs one dtype
        precision = str(getattr(trainer, "precision", "")) if trainer is not None else ""
        return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)

    @final
    def parameter_counts(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts of the built model."""
        assert self.model is not None
        params = {id(p): p for p in self.model.parameters()}.values()  # tied weights counted once
        return sum(p.numel() for p in params if p.requires_grad), sum(_logical_numel(p) for p in params)

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
        loss, n_tokens = self.task.loss(self.model, batch)
        self._step_ids += self._local_ids(batch)  # to name the examples if this step is skipped
        nonfinite, unsupervised = self._any_rank(not bool(torch.isfinite(loss)), int(n_tokens) == 0)
        if unsupervised:
            ids = sorted(set(self._gather_ids(self._local_ids(batch))))
            raise UserError(f"step {self.trainer.global_step + 1}: a training batch has no supervised token (every "
                            f"label is -100), so its loss would be 0 and teach nothing; it held {ids}. Check the data "
                            "with `ftframe inspect-data --config <your config>` (the response field, the template's "
                            "mask, max_length)")
        if nonfinite:
            # skipped in on_before_optimizer_step; a zero loss over the trainable weights keeps every process's
            # backward (and DDP's gradient reduction) in step
            self._skip_step = True
            return sum((p.sum() * 0.0 for p in self.parameters() if p.requires_grad), torch.zeros((), device=self.device))
        bs = batch_examples(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/tokens", n_tokens.float(), reduce_fx="sum", batch_size=bs)
        return loss

    def on_validation_epoch_start(self) -> None:
        # fresh state in the current grad mode: a state created under ``trainer.validate``'s inference mode cannot
        # be updated by the validation that runs inside ``fit`` (e.g. validate_before_fit, then a sanity check)
        self._reset_eval("val")

    def on_test_epoch_start(self) -> None:
        self._reset_eval("test")

    @final
    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    @final
    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Updates the test loss and metrics; returns per-example records for error-analysis callbacks."""
        outputs = self._eval_step("test", batch, dataloader_idx)
        return self.task.examples(batch, outputs) if outputs is not None else []

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    # evaluation plumbing: one loss mean and one task-metric collection per stage, plus one of each per data set when
    # the data module has several (``dataset_names``, e.g. MultitaskDataModule); logged at the epoch's end
    def _eval_step(self, stage: str, batch: dict[str, Any], dataloader_idx: int) -> Any:
        assert self.model is not None
        loss, weight, outputs = self.task.evaluate(self.model, batch)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        self.val_loss.update(loss, weight=weight)  # weighted (e.g. by tokens) mean over the whole set
        if metrics is not None and outputs is not None:
            metrics.update(*outputs)
        names = self._dataset_names()
        if names:
            key = f"{stage}__{names[dataloader_idx]}"
            if key not in self._member_loss:
                self._member_loss[key] = MeanMetric().to(self.device)
                member = self.task.metrics()
                if member is not None:
                    self._member_metrics[key] = member.to(self.device)
            self._member_loss[key].update(loss, weight=weight)
            if key in self._member_metrics and outputs is not None:
                self._member_metrics[key].update(*outputs)
        return outputs

    def _dataset_names(self) -> list[str] | None:
        names = getattr(getattr(self._trainer, "datamodule", None), "dataset_names", None) if self._trainer else None
        return list(names) if names and len(names) > 1 else None

    def _reset_eval(self, stage: str) -> None:
        self.val_loss.reset()
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        if metrics is not None:
            metrics.reset()
        for key, metric in [*self._member_loss.items(), *self._member_metrics.items()]:
            if key.startswith(f"{stage}__"):
                metric.reset()

    def _log_eval(self, stage: str) -> None:
        if self.trainer.sanity_checking or not self.val_loss.update_called:
            return
        # values reduced over all ranks by torchmetrics: logged without another sync, alike on every rank
        self.log(f"{stage}/loss", self.val_loss.compute(), prog_bar=stage == "val", sync_dist=False)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        self._log_task_metrics(stage, f"{stage}/", metrics)
        for key, loss in self._member_loss.items():
            if key.startswith(f"{stage}__") and loss.update_called:
                name = key.split("__", 1)[1]
                self.log(f"{stage}/{name}/loss", loss.compute(), sync_dist=False)
                self._log_task_metrics(f"{stage}/{name}", f"{stage}/{name}/", self._member_metrics[key]
                                       if key in self._member_metrics else None)

    def _log_task_metrics(self, where: str, prefix: str, metrics: Any) -> None:
        if metrics is None or not any(m.update_called for m in metrics.values()):
            return
        computed = metrics.compute()
        self.computed_metrics[where] = {k: v.detach().cpu() for k, v in computed.items()}
        self.log_dict({f"{prefix}{k}": v for k, v in self.task.log_values(computed).items()}, sync_dist=False)

    @final
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        assert self.model is not None
        return self.task.predict(self.model, batch, self.tokenizer)

    @final
    def on_before_optimizer_step(self, optimizer: Any) -> None:
        grads = [p.grad for p in self.parameters() if p.requires_grad and p.grad is not None]
        bad_grads = False
        if grads and getattr(self.trainer.precision_plugin, "scaler", None) is None:  # (fp16's scaler skips infs)
            # one fused norm over all gradients (inf/NaN anywhere makes it non-finite), one host sync per step
            bad_grads = not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
            if shards_parameters(self.trainer):  # each rank checked its shard of the gradients
                bad_grads = self._any_rank(bad_grads)
        local_ids, self._step_ids = self._step_ids, []
        if not (self._skip_step or bad_grads):
            return
        what = "loss" if self._skip_step else "gradients"
        ids = sorted(set(self._gather_ids(local_ids)))
        self._skip_step = False
        optimizer.zero_grad(set_to_none=True)  # the optimizer leaves parameters without gradients as they are
        self.nonfinite_steps += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), reduce_fx="max")
        step = self.trainer.global_step + 1
        if ids and isinstance(ids[0], str):  # classification batches carry file:line
            examples = "the examples at " + ", ".join(ids)
        else:
            examples = f"training examples {ids} (positions in the training split)" if ids else "its examples"
        if self.nonfinite_steps > self.max_nonfinite_steps:
            from ftframe.callbacks.adapter_checkpoint import AdapterCheckpoint

            saved = [cb.last_model_path for cb in self.trainer.callbacks
                     if isinstance(cb, AdapterCheckpoint) and cb.last_model_path]
            kept = (f"The last checkpoint, {Path(saved[0]).parent}, holds the state before it" if saved
                    else "No checkpoint had been written")
            raise UserError(f"step {step}: non-finite {what} ({self.nonfinite_steps} steps so far, more than "
                            f"max_nonfinite_steps={self.max_nonfinite_steps}); the batch held {examples}. Training "
                            f"stopped. {kept}. Lower the learning rate, use bf16-mixed rather than 16-mixed, or check "
                            "those examples")
        rank_zero_warn(f"[ftframe] step {step}: non-finite {what}; step skipped, weights unchanged "
                       f"({self.nonfinite_steps} of at most {self.max_nonfinite_steps}); the batch held {examples}")

    def _any_rank(self, *flags: bool) -> Any:
        """Whether each flag is set on any process (one collective for all); a single flag gives a single bool."""
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            t = torch.tensor([float(f) for f in flags], device=self.device)
            flags = tuple(bool(v) for v in trainer.strategy.reduce(t, reduce_op="max").tolist())
        return flags[0] if len(flags) == 1 else flags

    @staticmethod
    def _local_ids(batch: dict[str, Any]) -> list[Any]:
        """The batch's example ids (positions in the split), or ``file:line`` for batches that carry them."""
        ids = batch.get("example_ids")
        return [int(i) for i in ids.tolist()] if isinstance(ids, torch.Tensor) else list(batch.get("where") or [])

    def _gather_ids(self, mine: list[Any]) -> list[Any]:
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():
            every: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(every, mine)
            mine = [i for rank in every for i in rank]
        return mine

    def configure_optimizers(self) -> Any:
        from transformers import get_scheduler

        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                # biases and norm scales are vectors; decaying them hurts and is conventionally skipped
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        params = [g for g in groups if g["params"]]
        fused = self.fused_optimizer and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                             for g in params for p in g["params"])
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate, betas=self.betas, fused=fused or None)
        total = self.trainer.estimated_stepping_batches
        total = int(total) if math.isfinite(total) else 0
        warmup = int(self.warmup_steps) if self.warmup_steps >= 1 else int(self.warmup_steps * total)
        if self.lr_schedule == "cosine":
            name, extra = "cosine_with_min_lr", {"min_lr_rate": self.min_lr_ratio}
        elif self.lr_schedule == "linear":
            name, extra = "linear", {}
        else:
            name, extra = "constant_with_warmup", {}
        if total == 0 and name != "constant_with_warmup":
            raise UserError(f"lr_schedule={self.lr_schedule!r} needs a known number of steps: set trainer.max_steps "
                            "or trainer.max_epochs, or use lr_schedule: constant")
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total, 1),
                                  scheduler_specific_kwargs=extra)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @final
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # keep trainable weights only: the frozen base is reloaded from model_name on resume. A sharded FSDP
        # checkpoint is the exception: torch.distributed.checkpoint restores every key of the model, frozen included
        strategy = getattr(self._trainer, "strategy", None) if self._trainer is not None else None
        if getattr(strategy, "_state_dict_type", "full") == "sharded":
            return
        names = trainable_names(self)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in names}


def _zero3_loading_config(trainer: Any) -> Any:
    """transformers' ``HfDeepSpeedConfig`` for a DeepSpeed ZeRO-3 run (its existence switches ``from_pretrained`` to
    loading into partitioned weights), else ``None``."""
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    if not getattr(strategy, "zero_stage_3", False):
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(strategy.config)


def _materialize(module: torch.nn.Module, device: torch.device,
                 tied: dict[int, list[tuple[torch.nn.Module, str]]]) -> None:
    """FSDP ``param_init_fn``: storage for a meta-device module's own tensors (their values come from rank 0).

    ``tied``: the modules holding each shared parameter (by the meta parameter's id), which receive the new tensor
    too -- ``to_empty`` replaces a parameter in its own module only, and a broken tie would change the model.
    """
    own = dict(module.named_parameters(recurse=False))
    if not any(t.is_meta for t in (*own.values(), *module.buffers(recurse=False))):
        return  # (FSDP passes modules around the meta ones too, e.g. metrics)
    module.to_empty(device=device, recurse=False)
    for name, before in own.items():
        for holder, attr in tied.get(id(before), []):
            if holder is not module:
                setattr(holder, attr, getattr(module, name))


def _unwrap_leaf(name: str) -> str:
    """``name`` without a wrapper part right before its last component (the wrapped module's own parameter)."""
    head, _, leaf = name.rpartition(".")
    while head and clean_name(head.rpartition(".")[2] + ".") == "":
        head = head.rpartition(".")[0]
    return f"{head}.{leaf}" if head else leaf


def _clean_saved_names(directory: Path) -> None:
    """Rewrite ``directory``'s safetensors files with parameter names free of wrapper parts (FSDP's)."""
    from safetensors.torch import load_file, save_file

    for path in directory.glob("*.safetensors"):
        tensors = load_file(str(path))
        if any(clean_name(k) != k for k in tensors):
            save_file({clean_name(k): v for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _weights_kwargs(state_dict: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """``save_pretrained``'s ``state_dict`` argument from weights keyed as the LightningModule's (``model.``...)."""
    if state_dict is None:
        return {}
    weights = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
    if PROMPT_EMBEDDINGS in state_dict:
        weights[PROMPT_EMBEDDINGS] = state_dict[PROMPT_EMBEDDINGS]
    return {"state_dict": weights}


def _logical_numel(p: torch.Tensor) -> int:
    """Number of weights a parameter stands for: a bitsandbytes 4-bit tensor packs two per byte."""
    state = getattr(p, "quant_state", None)
    shape = getattr(state, "shape", None)
    return math.prod(shape) if shape is not None else p.numel()


def add_neftune(model: torch.nn.Module, alpha: float) -> None:
    """Add NEFTune noise to the input embeddings' output in training mode (see ``neftune_alpha``)."""
    embeddings = model.get_input_embeddings()

    def hook(module: torch.nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return out
        lengths = token_lengths()
        if lengths is not None and lengths.numel() == out.shape[1]:
            scale = alpha / torch.sqrt(lengths.to(out.device, torch.float32) * out.shape[-1])[None, :, None]
        else:
            scale = alpha / math.sqrt(out.shape[1] * out.shape[-1])
        return out + torch.empty_like(out).uniform_(-1, 1) * scale

    embeddings.register_forward_hook(hook)


def _check_target_modules(model: torch.nn.Module, config: Any, method: str) -> None:
    """Fail early, naming the valid choices, when a peft config targets modules the model does not have."""
    targets = getattr(config, "target_modules", None)
    if targets is None or isinstance(targets, str):  # None: peft's per-architecture default; str: regex/"all-linear"
        return
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    missing = sorted(t for t in targets if t not in leaf_names and not any(n.endswith(t) for n, _ in model.named_modules()))
    if missing:
        raise UserError(f"{method}: target_modules {missing} not found in {type(model).__name__}. Linear modules of "
                        f"this model: {linear}; or use target_modules: all-linear")


@contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
