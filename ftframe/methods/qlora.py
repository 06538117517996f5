"""QLoRA: LoRA adapters on a base model stored in 4-bit NormalFloat (NF4).

The frozen base is quantized at load time by bitsandbytes (optionally with double quantization of the scales);
adapters train in the compute dtype (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314). Runs on CUDA and,
with bitsandbytes >= 0.46, on CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from ftframe.artifacts import BASE_QUANTIZATION_FILE, TrainedFolder, load_peft_adapter, merge_peft
from ftframe.distributed import shards_parameters
from ftframe.errors import UserError
from ftframe.methods.base import FineTuneModule, Variant
from ftframe.methods.lora import lora_config
from ftframe.models import DTYPES, load_model, resolve_model

__all__ = ["BASE_QUANTIZATION_FILE", "QLoRA", "keep_trainable_layout", "loftq_initialize", "nf4_config"]


class QLoRA(FineTuneModule):
    """LoRA on a 4-bit quantized base model.

    Args:
        r: Rank of the update matrices.
        alpha: Scaling numerator; the update is scaled by ``alpha / r``.
        dropout: Dropout on the adapter input.
        target_modules: Module names to adapt, or ``all-linear``.
        bias: Which biases to train alongside the adapters.
        quant_type: 4-bit data type of the frozen weights.
        double_quant: Also quantize the quantization constants (saves ~0.4 bit per parameter).
        compute_dtype: dtype the 4-bit weights are dequantized to for matmuls. ``auto``: the Trainer's precision's
            (bfloat16 under ``bf16-*``, float16 under ``16-*``, else float32 -- so on a CPU without fast bfloat16,
            where ``precision: auto`` resolves to ``32-true``, no matmul runs in a slow 16-bit kernel).
        quant_storage: dtype the packed 4-bit weights are stored in. ``auto``: ``uint8`` (bitsandbytes' default), or
            under FSDP the dtype FSDP computes in (``bfloat16`` for ``bf16-*`` precisions, ``float16`` for ``16-*``,
            ``float32`` for ``32-true``), with the other frozen weights loaded in it too: FSDP flattens a block's
            weights into one tensor of one dtype and casts it to that dtype before use, which leaves the packed bytes
            intact only then. The LoRA weights stay in their own dtype (FSDP units of their own).
        init: How the LoRA factors start. ``default``: ``B = 0`` (training starts from the quantized base). ``loftq``
            (Li et al., 2023, https://arxiv.org/abs/2310.08659): from the rank-``r`` SVD of each weight's quantization
            error ``W - dequant(quant(W))``, so training starts closer to the full-precision model. The saved adapter
            belongs to the 4-bit base: ``ftframe generate`` loads that base quantized the same way.
        **kwargs: See :class:`FineTuneModule`.
    """

    variants = {
        "QLoRA": Variant({"r": 4, "dropout": 0.0, "compute_dtype": "float32", "double_quant": False}, "lora_[AB]",
                         compare=("qlora", "qlora")),
        "LoftQ": Variant({"r": 4, "dropout": 0.0, "compute_dtype": "float32", "double_quant": False, "init": "loftq"},
                         "lora_[AB]", compare=("loftq", "loftq")),
    }

    meta_init = False  # bitsandbytes quantizes weights as they load: every rank loads the base itself

    def __init__(
        self,
        *args,
        r: int = 16,
        alpha: float = 32.0,
        dropout: float = 0.05,
        target_modules: str | list[str] = "all-linear",
        bias: Literal["none", "all", "lora_only"] = "none",
        quant_type: Literal["nf4", "fp4"] = "nf4",
        double_quant: bool = True,
        compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto",
        quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = "auto",
        init: Literal["default", "loftq"] = "default",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lora = dict(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, bias=bias)
        self.quant_type = quant_type
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        self.quant_storage = quant_storage
        self.init = init
        self.peft_config()

    def peft_config(self) -> Any:
        return lora_config(**self.lora)

    def quantization_config(self) -> Any:
        """The ``BitsAndBytesConfig`` the base is loaded with."""
        storage = self.quant_storage
        if storage == "auto":
            storage = self._sharded_dtype() or "uint8"
        return nf4_config(self.quant_type, self.double_quant, self.resolved_compute_dtype(), storage)

    def resolved_compute_dtype(self) -> str:
        """:attr:`compute_dtype`, with ``auto`` read from the Trainer's precision (float32 without a Trainer)."""
        if self.compute_dtype != "auto":
            return self.compute_dtype
        precision = str(getattr(self._trainer, "precision", "")) if self._trainer is not None else ""
        return "bfloat16" if precision.startswith("bf16") else "float16" if precision.startswith("16") else "float32"

    def _sharded_dtype(self) -> str | None:
        """Under FSDP: the dtype FSDP computes in, which every frozen weight is stored in; else ``None``.

        FSDP flattens a block's weights into one tensor of one dtype and casts it to the precision's compute dtype
        before each forward: the packed 4-bit bytes survive that only when they are already stored in that dtype.
        """
        if not shards_parameters(self._trainer):
            return None
        precision = str(getattr(self._trainer, "precision", ""))
        if precision.startswith("bf16"):
            return "bfloat16"
        if precision.startswith("16"):
            return "float16"
        return "float32"

    def load_base_model(self) -> torch.nn.Module:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise UserError("QLoRA needs bitsandbytes: pip install 'bitsandbytes>=0.46'") from e
        strategy = getattr(self._trainer, "strategy", None) if self._trainer is not None else None
        if getattr(strategy, "zero_stage_3", False):
            raise UserError("QLoRA cannot run under DeepSpeed ZeRO-3 in ftframe: Lightning builds the model inside "
                            "deepspeed.zero.Init, which partitions weights as they are created, while bitsandbytes "
                            "quantizes them whole as they load. Shard 4-bit weights with FSDP instead "
                            "(configs/strategy/fsdp.yaml: the 4-bit weights are stored in the dtype FSDP computes in), or use "
                            "configs/strategy/deepspeed_zero2.yaml or ddp.yaml, where every GPU holds the 4-bit base")
        from peft import prepare_model_for_kbit_training

        quant = self.quantization_config()
        # bitsandbytes quantizes while loading, so weights must land directly on the training device
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        sharded = self._sharded_dtype()
        if sharded is not None and self.quant_storage not in ("auto", sharded):
            raise UserError(f"QLoRA quant_storage {self.quant_storage!r} under {type(self._trainer.strategy).__name__} "
                            f"with precision {self._trainer.precision}: FSDP casts each block's flat weights to "
                            f"{sharded} before using them, which would scramble 4-bit weights packed in another dtype. "
                            f"Use quant_storage: auto (or {sharded})")
        model = load_model(self.model_name, self.task.auto_class(), dtype=sharded or self.dtype_name,
                           quantization_config=quant, device_map={"": device}, **self.task.model_kwargs())
        if sharded is None:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=self.gradient_checkpointing)
        else:
            # not peft's preparation, which upcasts the frozen norms and embeddings to float32: a block's weights
            # must share the 4-bit storage dtype to be flattened together (FSDP keeps LoRA's in units of their own)
            model.requires_grad_(False)
            if self.gradient_checkpointing:
                model.enable_input_require_grads()
        keep_trainable_layout(model)
        return model

    def adapt(self, model: Any) -> Any:
        model = super().adapt(model)
        if self.init == "loftq":
            n = loftq_initialize(model, resolve_model(self.model_name))
            rank_zero_info(f"[ftframe] LoftQ: initialized {n} LoRA pairs from the 4-bit quantization error")
        return model

    def disable_adapters(self) -> Any:
        # LoftQ factors correct the 4-bit base's error: the model at step 0 is base + factors, not the bare 4-bit base
        return super().disable_adapters() if self.init == "default" else None

    def save_trained(self, directory: Any, state_dict: Any = None) -> None:
        super().save_trained(directory, state_dict)
        # the adapter was trained on *this* 4-bit base: record how to rebuild it, for ftframe generate / merge and users
        why = ("LoftQ-initialized LoRA factors correct the 4-bit base's quantization error" if self.init == "loftq"
               else "QLoRA trained these LoRA weights on the 4-bit base")
        base = {"quantization_config": self.quantization_config().to_dict(),
                "why": f"{why}; load the base quantized with this config to get the trained model (ftframe merge "
                       "folds the adapter into this base dequantized to float32)"}
        (Path(directory) / BASE_QUANTIZATION_FILE).write_text(json.dumps(base, indent=2))

    @classmethod
    def load_base(cls, folder: TrainedFolder, name: str, dtype: Any) -> torch.nn.Module:
        """The 4-bit base exactly as in training, computing in ``dtype``, kept in the layout training used."""
        from transformers import BitsAndBytesConfig

        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise UserError(f"{folder.path} was trained on a 4-bit base (QLoRA / LoftQ); rebuilding it needs "
                            "bitsandbytes: pip install 'bitsandbytes>=0.46'") from e
        quant = dict(folder.quantization or _recorded_quantization(folder.metadata.get("hparams") or {}))
        quant["bnb_4bit_compute_dtype"] = dtype  # the same 4-bit values, whatever the matmuls compute in
        auto, kwargs = folder.auto_class()
        base = load_model(name, auto, dtype=dtype, quantization_config=BitsAndBytesConfig.from_dict(quant),
                          device_map={"": "cuda" if torch.cuda.is_available() else "cpu"}, **kwargs)
        keep_trainable_layout(base)  # no in-place repacking of the 4-bit weights by an inference forward
        return base

    @classmethod
    def merge_trained(cls, folder: TrainedFolder, model: str | None = None) -> tuple[torch.nn.Module, str]:
        """Merged onto the 4-bit base *dequantized* to float32 -- the weights the adapter was trained against, in
        high precision -- never into 4-bit weights (re-quantizing would round the adapter's update away)."""
        name = folder.base_name(model)
        quantized = cls.load_base(folder, name, "float32")
        dequantized = _dequantized_state(quantized)  # before any forward
        auto, _ = folder.auto_class()
        config = quantized.config.__class__.from_dict(quantized.config.to_dict())
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = auto.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(dequantized, strict=False)
        tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False) \
            else set()
        if set(missing) - tied or unexpected:
            raise UserError(f"rebuilding the dequantized base of {folder.path} did not match its weights "
                            f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
        plain.tie_weights()
        plain.generation_config = quantized.generation_config
        del quantized
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        merged = merge_peft(load_peft_adapter(plain.to(device), folder.path, name), folder.path)
        return merged, ("merged onto the 4-bit base dequantized to float32 (the weights the adapter was trained "
                        "against), not into 4-bit weights")


@torch.no_grad()
def _dequantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of a bitsandbytes 4-bit model in float32, the 4-bit weights dequantized (keyed as a plain
    model's ``state_dict``)."""
    import bitsandbytes as bnb

    out: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for pname, param in module.named_parameters(recurse=False):
            if isinstance(module, bnb.nn.Linear4bit) and pname == "weight":
                value = bnb.functional.dequantize_4bit(param.data, param.quant_state)
            else:
                value = param.data
            out[prefix + pname] = value.detach().to("cpu", torch.float32)
    return out


def _recorded_quantization(hparams: dict[str, Any]) -> dict[str, Any]:
    """The BitsAndBytesConfig (as a dict) QLoRA trained with, from its saved hyperparameters (defaults where absent):
    for folders written before the base's config was saved next to the adapter."""
    import inspect

    params = inspect.signature(QLoRA.__init__).parameters

    def get(name: str) -> Any:
        return hparams.get(name, params[name].default)

    # the storage dtype only packs the same 4-bit values differently: uint8 is the one that runs anywhere
    return nf4_config(get("quant_type"), get("double_quant"), get("compute_dtype"), "uint8").to_dict()


def nf4_config(quant_type: str, double_quant: bool, compute_dtype: str, quant_storage: str) -> Any:
    """A 4-bit ``BitsAndBytesConfig`` (what QLoRA trains on, and what ``ftframe merge`` rebuilds to dequantize).

    ``compute_dtype`` ``auto`` (a run's saved hyperparameter) is float32 here: it changes no 4-bit value.
    """
    from transformers import BitsAndBytesConfig

    compute_dtype = "float32" if compute_dtype == "auto" else compute_dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=DTYPES[compute_dtype],
        bnb_4bit_quant_storage=torch.uint8 if quant_storage == "uint8" else DTYPES[quant_storage],
    )



@torch.no_grad()
def loftq_initialize(model: torch.nn.Module, folder: str, adapter: str = "default") -> int:
    """LoftQ (one alternating step) on a peft LoRA model over a bitsandbytes 4-bit base; returns the layers changed.

    For each quantized linear layer with a LoRA pair, the full-precision weight ``W`` is read lazily from the base's
    safetensors in ``folder`` and the pair is set to the best rank-``r`` approximation of ``W - dequant(Q)``, where
    ``Q`` is the layer's 4-bit weight, scaled so that ``scaling * B @ A`` equals it. ``Q`` itself is unchanged, so the
    adapter still applies to a fresh 4-bit load of the same base. (peft's own LoftQ helpers compute on CUDA only.)
    """
    import bitsandbytes as bnb
    from peft.tuners.lora import Linear4bit

    weights = _safetensors_index(folder)
    opened: dict[str, Any] = {}
    changed = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit) or adapter not in module.lora_A:
            continue
        key = name.split("base_model.model.", 1)[-1] + ".weight"
        if key not in weights:
            raise UserError(f"LoftQ: weight {key!r} not found in the safetensors files of {folder}")
        from safetensors import safe_open

        file = weights[key]
        if file not in opened:
            opened[file] = safe_open(file, framework="pt", device="cpu")
        qweight = module.get_base_layer().weight
        full = opened[file].get_tensor(key).to(qweight.device, torch.float32)
        residual = full - bnb.functional.dequantize_4bit(qweight.data, qweight.quant_state).float()
        rank = module.r[adapter]
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        root = s[:rank].sqrt()
        scale = math.sqrt(module.scaling[adapter])
        lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        lora_a.copy_((root[:, None] * vh[:rank]) / scale)
        lora_b.copy_((u[:, :rank] * root[None, :]) / scale)
        changed += 1
    if changed == 0:
        raise UserError("LoftQ found no LoRA layer on a 4-bit quantized weight; check target_modules")
    return changed


def _safetensors_index(folder: str) -> dict[str, str]:
    """Map each tensor name to its safetensors file for a local model folder (or a cached hub snapshot)."""
    path = Path(folder)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(folder, allow_patterns=["*.safetensors", "*.json"]))
        except Exception as e:  # noqa: BLE001 - any hub failure means the same thing here
            raise UserError(f"LoftQ needs the base's full-precision safetensors; could not get them for {folder!r}: "
                            f"{e}") from None
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {k: str(path / f) for k, f in json.loads(index.read_text())["weight_map"].items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"LoftQ needs the base's full-precision weights as safetensors; {path} has none")
    from safetensors import safe_open

    out: dict[str, str] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as handle:
            out.update(dict.fromkeys(handle.keys(), str(f)))
    return out


def keep_trainable_layout(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout; returns the layers changed.

    On CPUs with AVX512-BF16, a ``Linear4bit`` called in eval mode without gradients (a validation pass) converts its
    weight in place to a layout whose matmul kernel has no autograd support, and keeps it: the training steps that
    follow would then get no gradient through the quantized layers. A training model must keep the plain layout.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
