"""The task seam's base class and the helpers tasks share (virtual tokens, the decoder / output-layer split)."""

from __future__ import annotations

from typing import Any

import torch

from ftframe.models import transformers_model

__all__ = ["Task", "decoder_and_head", "virtual_tokens"]


class Task:
    """Base of all tasks. Subclasses set :attr:`peft_task_type` and implement :meth:`auto_class` and :meth:`loss`.

    Optional members: :meth:`bind` (read what the task needs from the data module), :meth:`model_kwargs` (extra
    ``from_pretrained`` arguments), :meth:`head` (the output layer), and :meth:`evaluate` + :meth:`metrics` for metrics
    beyond the loss.
    """

    peft_task_type: str = ""
    #: Whether :meth:`loss`'s weight counts tokens, so that an optimizer step's loss is the mean over every token of
    #: all its micro-batches and processes (docs/distributed.md, "One step, one token mean"); otherwise each
    #: micro-batch's mean weighs the same (classification: batches of examples).
    token_weighted: bool = False
    #: Whether :meth:`head` is freshly initialized (so it must train whatever the method freezes).
    new_head: bool = False
    #: Whether the method should keep its starting adapter (``init_adapter``) loaded, frozen, for
    #: :meth:`FineTuneModule.reference_context` (``Preference``).
    needs_reference_model: bool = False

    def auto_class(self) -> Any:
        """The ``transformers`` auto-class that loads the backbone for this task."""
        raise NotImplementedError(f"{type(self).__name__} must implement auto_class()")

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(mean loss, weight)``; the weight (e.g. supervised tokens) makes means over batches exact."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss()")

    def bind(self, datamodule: Any) -> None:
        """Called before the model is built, with the trainer's data module (or ``None``). Default: nothing."""

    def model_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for ``auto_class().from_pretrained`` / ``from_config``."""
        return {}

    def check_model(self, model: torch.nn.Module, method: str) -> None:
        """Refuse an adapted model this task cannot run (called right after the method adapts it). Default: accept."""

    def head(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The task's output layer inside ``model`` (trained by LastLayers, saved with adapters), or ``None``."""
        base = transformers_model(model)
        return base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None

    def metrics(self) -> Any:
        """A ``torchmetrics.MetricCollection`` updated with :meth:`evaluate`'s outputs, or ``None`` (loss only)."""
        return None

    def evaluate(self, model: torch.nn.Module,
                 batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """``(mean loss, weight, metric inputs)`` for validation and test; metric inputs are ``(preds, target)``."""
        loss, weight = self.loss(model, batch)
        return loss, weight, None

    def metric_names(self) -> tuple[str, ...]:
        """The names :meth:`log_values` can return (``*`` stands for a label); ``loss`` is always logged besides.

        ``ftframe tune`` checks an objective against these before it starts a trial.
        """
        return ()

    def log_values(self, computed: dict[str, torch.Tensor]) -> dict[str, float]:
        """Turn :meth:`metrics`' computed values into scalars to log (names without the ``val/`` prefix)."""
        return {k: float(v) for k, v in computed.items() if v.numel() == 1}

    def examples(self, batch: dict[str, Any], outputs: Any) -> list[dict[str, Any]]:
        """Per-example records of an evaluated batch (for error analysis); default: none."""
        return []

    def predict(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], tokenizer: Any) -> list[dict[str, Any]]:
        """Per-example predictions for ``ftframe predict``."""
        raise NotImplementedError(f"{type(self).__name__} must implement predict()")

    # ------------------------------------------------------------------ hooks for tasks that need more than a batch
    def attach(self, module: Any) -> None:
        """Called once the method's model is built, with the method (the ``FineTuneModule``): a task that needs more
        than the model -- :class:`Preference`: the reference model -- keeps what it needs. Default: nothing."""

    def on_fit_start(self, module: Any) -> None:
        """Called as fitting starts, after a checkpoint being resumed has been restored. Default: nothing."""

    def train_logs(self) -> dict[str, torch.Tensor]:
        """Scalars of the last training :meth:`loss` call, logged as ``train/<name>`` beside the loss (averaged over
        processes). Default: none."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State saved in checkpoints and restored by :meth:`load_state_dict` on resume. Default: none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""



def virtual_tokens(model: torch.nn.Module) -> tuple[bool, int]:
    """Whether ``model`` uses a peft prompt-learning method, and how many virtual tokens it puts before the input."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return False, 0
    if str(getattr(config, "peft_type", "")).endswith("PREFIX_TUNING"):
        return True, 0  # prefix tuning extends every layer's attention keys/values, not the input
    return True, int(config.num_virtual_tokens)


def decoder_and_head(model: torch.nn.Module,
                      inputs: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """``(decoder, output layer)`` when ``model(x).logits == head(decoder(x))``, else ``None``.

    Decided once per model by comparing both on the first few tokens of a real batch, so architectures that
    post-process logits (soft-capping, scaling) or peft methods that add virtual tokens use the plain path.
    """
    verdict = getattr(model, "_ftframe_split_ok", None)
    if verdict is False:
        return None
    config = getattr(model, "active_peft_config", None)
    if config is not None and getattr(config, "is_prompt_learning", False):
        model._ftframe_split_ok = False
        return None
    base = transformers_model(model)
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or head is None or decoder is base:
        model._ftframe_split_ok = False
        return None
    if verdict is None:
        n = min(8, inputs["input_ids"].shape[1])
        probe = {k: v[:1, :n] for k, v in inputs.items()}
        # eval mode (dropout would make the two passes differ) and a forked RNG (the check must not shift the random
        # stream, or a resumed run -- which checks at its first step -- would draw other dropout masks)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                whole = model(**probe, use_cache=False).logits.float()
                split = head(decoder(**probe, use_cache=False).last_hidden_state).float()
        finally:
            model.train(was_training)
        ok = whole.shape == split.shape and torch.allclose(whole, split, rtol=1e-3, atol=1e-3)
        model._ftframe_split_ok = bool(ok)
        if not ok:
            return None
    return decoder, head


