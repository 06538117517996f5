"""LoRA: low-rank adapters added to frozen linear layers.

Each targeted weight ``W`` is used as ``W + (alpha / r) * B @ A`` with ``A`` (r x in) and ``B`` (out x r) trained and
``B`` starting at zero, so training starts from the base model (Hu et al., 2021, https://arxiv.org/abs/2106.09685).
Built on ``peft.LoraConfig``; the saved adapter loads with ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

from typing import Any, Literal

from ftframe.distributed import shards_parameters
from ftframe.errors import UserError
from ftframe.methods.base import FineTuneModule, Variant

__all__ = ["LoRA", "lora_config"]


def lora_config(
    r: int, alpha: float, dropout: float, target_modules: str | list[str], bias: str, use_rslora: bool = False,
    init: str = "default",
) -> Any:
    """Build a ``peft.LoraConfig`` after checking the values (shared by LoRA and QLoRA)."""
    from peft import LoraConfig

    if r < 1:
        raise UserError(f"r (LoRA rank) must be >= 1, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"dropout must be in [0, 1), got {dropout}")
    if isinstance(target_modules, list) and not target_modules:
        raise UserError("target_modules is empty; name modules (e.g. [q_proj, v_proj]) or use 'all-linear'")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        bias=bias,
        use_rslora=use_rslora,
        init_lora_weights=True if init == "default" else init,
    )


class LoRA(FineTuneModule):
    """Low-rank adaptation of linear layers.

    Args:
        r: Rank of the update matrices.
        alpha: Scaling numerator; the update is scaled by ``alpha / r``.
        dropout: Dropout on the adapter input.
        target_modules: Module names to adapt (e.g. ``[q_proj, v_proj]``), or ``all-linear`` for every linear layer
            except the output head.
        bias: Which biases to train alongside the adapters.
        init: How the factors start. ``default``: ``B = 0`` (training starts from the base model). ``pissa``
            (Meng et al., 2024, https://arxiv.org/abs/2404.02948) / ``olora`` (Buyukakyuz, 2024,
            https://arxiv.org/abs/2406.01775): from the principal components (SVD) / a QR decomposition of each weight,
            which is replaced by the residual so the model starts unchanged. The saved adapter is converted to a plain
            LoRA adapter (rank ``2 r``) that applies to the original base. ``loftq`` is refused here: it needs a
            quantized base (``QLoRA`` with ``init: loftq``).
        use_rslora: Scale the update by ``alpha / sqrt(r)`` instead of ``alpha / r`` (rank-stabilised LoRA, Kalajdzievski,
            2023, https://arxiv.org/abs/2312.03732), which keeps the update's size steady as ``r`` grows.
        **kwargs: See :class:`FineTuneModule`.
    """

    variants = {
        "LoRA": Variant({"r": 4, "dropout": 0.0}, "lora_[AB]", compare=("lora", "lora")),
        "LoRA-qv": Variant({"r": 2, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                           r"(q_proj|v_proj)\.lora_[AB]\.", matrix=False),
        "rsLoRA": Variant({"r": 4, "dropout": 0.0, "use_rslora": True}, "lora_[AB]", matrix=False,
                          compare=("rslora", "lora --model.use_rslora=true")),
        "PiSSA": Variant({"r": 4, "dropout": 0.0, "init": "pissa"}, "lora_[AB]", matrix=False,
                         compare=("pissa", "lora --model.init=pissa")),
        "OLoRA": Variant({"r": 4, "dropout": 0.0, "init": "olora"}, "lora_[AB]", matrix=False,
                         compare=("olora", "lora --model.init=olora")),
    }

    # the frozen base weights are used only in matmuls: frozen_dtype: auto may store them in the autocast dtype
    cast_frozen_weights = True

    def __init__(
        self,
        *args,
        r: int = 16,
        alpha: float = 32.0,
        dropout: float = 0.05,
        target_modules: str | list[str] = "all-linear",
        bias: Literal["none", "all", "lora_only"] = "none",
        use_rslora: bool = False,
        init: Literal["default", "pissa", "olora", "loftq"] = "default",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if init == "loftq":
            raise UserError("LoRA init: loftq needs a quantized base: LoftQ starts the factors from the error of "
                            "quantizing each weight to 4 bits, and LoRA's base is not quantized. Use "
                            "--model=ftframe.methods.QLoRA --model.init=loftq (configs/methods/loftq.yaml), or "
                            "init: pissa / olora for a full-precision base")
        self.lora = dict(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, bias=bias,
                         use_rslora=use_rslora, init=init)
        self._initial_adapter: Any = None
        self.peft_config()  # validate options now, not after the model has loaded

    def peft_config(self) -> Any:
        return lora_config(**self.lora)

    def check_base(self, config: Any) -> None:
        super().check_base(config)
        if self.lora["init"] != "default" and self._trainer is not None and shards_parameters(self._trainer):
            raise UserError(f"LoRA init {self.lora['init']!r} cannot run under {type(self._trainer.strategy).__name__}: "
                            "saving converts the factors against the initial ones held by every process, which a "
                            "sharding strategy splits up. Use init: default with FSDP / DeepSpeed ZeRO-3, or "
                            "configs/strategy/ddp.yaml or deepspeed_zero2.yaml with this init")

    def adapt(self, model: Any) -> Any:
        model = super().adapt(model)
        if self.lora["init"] != "default":
            # keep the initial factors: saving converts the trained adapter into one for the original base weights
            import tempfile

            self._initial_adapter = tempfile.TemporaryDirectory(prefix="ftframe-lora-init-")
            config = model.peft_config["default"]
            config.init_lora_weights = True  # peft: the initial copy must load as a plain LoRA adapter
            self._save(model, self._initial_adapter.name)
            config.init_lora_weights = self.lora["init"]
        return model

    def disable_adapters(self) -> Any:
        # PiSSA / OLoRA move part of each weight into the factors: without the adapter the base is not the original
        return super().disable_adapters() if self.lora["init"] == "default" else None

    def save_trained(self, directory: Any, state_dict: Any = None) -> None:
        if self._initial_adapter is None:
            return super().save_trained(directory, state_dict)
        assert self.model is not None and state_dict is None  # adapt() refuses these inits under sharding
        self._save(self.model, str(directory), path_initial_model_for_weight_conversion=self._initial_adapter.name)
