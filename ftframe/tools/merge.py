"""``ftframe merge``: fold a trained adapter into its base model, or combine several LoRA adapters into one.

Merging writes a plain transformers folder (safetensors weights, config, generation config, tokenizer) that loads
with ``AutoModelForCausalLM.from_pretrained`` and needs neither peft nor ftframe. Before the folder is put in place it
is loaded back and its logits on a few prompts are compared with the unmerged base + adapter: the max abs difference
is reported, and a difference over the tolerance leaves nothing written. Adapters trained on a 4-bit base (QLoRA,
LoftQ) are merged onto that base *dequantized* to float32 -- the exact weights the adapter was trained against, in
high precision -- never into 4-bit weights (re-quantizing after merging would round the adapter's update away).

Combining (``--adapters A B ... --combination ...``) mixes LoRA adapters with peft's ``add_weighted_adapter`` (task
arithmetic, TIES, DARE, SVD) and writes a new adapter folder that plain ``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Literal
from unittest import mock

import torch

from ftframe.artifacts import (
    BASE_QUANTIZATION_FILE,
    METADATA_FILE,
    TrainedFolder,
    check_writable,
    read_trained,
    replace_dir,
    writing,
)
from ftframe.errors import UserError
from ftframe.methods import method_class
from ftframe.models import DTYPES, DTypeName, load_model, load_tokenizer, resolve_model

__all__ = ["COMBINATIONS", "DEFAULT_PROMPTS", "MERGE_REPORT", "TOLERANCE", "combine", "merge", "merge_in_memory"]

#: Written into every merged / combined folder: what went in, and the check's numbers.
MERGE_REPORT = "ftframe_merge.json"
#: Prompts the logits check runs when none are given (chat-templated when the tokenizer has a template).
DEFAULT_PROMPTS = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips "
    "did Natalia sell altogether in April and May?",
    "Hi, how are you today?",
    "Explain in one sentence what a neural network is.",
    "Write a haiku about autumn leaves.",
)
#: Max abs logit difference allowed between the written folder (loaded in float32) and the unmerged model, per saved
#: dtype. float32: merging itself (W + B @ A * s in float32) moves logits by ~1e-5; 16-bit dtypes add the rounding of
#: every weight, which on SmolLM2-135M moves logits of magnitude ~20-30 by up to ~0.3 (bfloat16, 8 significant bits)
#: and ~0.04 (float16, 11 bits).
TOLERANCE = {"float32": 1e-3, "float16": 0.15, "bfloat16": 1.0}
COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd",
                "cat", "magnitude_prune")
Combination = Literal["linear", "ties", "dare_linear", "dare_ties", "svd", "ties_svd", "dare_linear_svd",
                      "dare_ties_svd", "cat", "magnitude_prune"]


# --------------------------------------------------------------------------------------------------------- loading
def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_unmerged(info: TrainedFolder, model: str | None = None) -> Any:
    """The trained model as training saw it, in float32 (base + adapter; a 4-bit base quantized as in training)."""
    return method_class(info).load_trained(info, model, "float32")


def merge_in_memory(adapter: str, model: str | None = None,
                    dtype: DTypeName = "float32") -> tuple[Any, Any, dict[str, Any]]:
    """Fold ``adapter`` into its base: ``(plain transformers model in dtype, tokenizer, info)``.

    Folded by the method that wrote the folder (:meth:`FineTuneModule.merge_trained`). ``info`` says what was merged
    (method, base, how) and holds the unmerged model under ``"unmerged"`` (float32) for comparisons; drop it when done.
    """
    info = read_trained(adapter)
    tokenizer = load_tokenizer(str(info.path) if (info.path / "tokenizer_config.json").is_file()
                               else (model or info.base or str(info.path)))
    cls = method_class(info)
    merged, note = cls.merge_trained(info, model)  # (refuses methods that cannot merge before the unmerged loads)
    unmerged = cls.load_trained(info, model, "float32")
    merged = merged.to(DTYPES[dtype]).eval()
    details = {"adapter": str(info.path), "base": model or info.base or str(info.path), "method": info.method,
               "peft_type": info.peft_config.get("peft_type"), "dequantized_4bit_base": info.quantization is not None,
               "quantization": info.quantization, "note": note, "unmerged": unmerged.eval()}
    return merged, tokenizer, details


# --------------------------------------------------------------------------------------------------------- checking
def chat_prompts(tokenizer: Any, prompts: list[str] | tuple[str, ...]) -> list[str]:
    """The prompts as the model sees them: chat-templated (with the generation prompt) when there is a template."""
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in prompts]
    return list(prompts)


@torch.inference_mode()
def logits_diff(a: Any, b: Any, tokenizer: Any, prompts: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Max abs difference of two models' logits (float32) on the prompts' tokens, top-1 agreement, logit scale."""
    texts = chat_prompts(tokenizer, prompts)
    add_special = not getattr(tokenizer, "chat_template", None)
    worst, scale, agree, total = 0.0, 0.0, 0, 0
    for text in texts:  # one at a time: no padding to mask
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=add_special)
        la = a(**{k: v.to(_model_device(a)) for k, v in enc.items()}).logits.float().cpu()
        lb = b(**{k: v.to(_model_device(b)) for k, v in enc.items()}).logits.float().cpu()
        worst = max(worst, float((la - lb).abs().max()))
        scale = max(scale, float(la.abs().max()))
        agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
        total += la.shape[0] * la.shape[1] if la.dim() == 3 else la.shape[0]
    return {"max_abs_diff": worst, "logit_scale": scale, "top1_agreement": agree / max(total, 1),
            "positions": total, "prompts": len(texts)}


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------------------------------------- commands
def merge(
    adapter: str | None = None,
    adapters: list[str] | None = None,
    output: str = "merged",
    model: str | None = None,
    dtype: DTypeName = "float32",
    combination: Combination = "svd",
    weights: list[float] | None = None,
    density: float = 0.5,
    svd_rank: int | None = None,
    seed: int = 0,
    prompts: list[str] | None = None,
    tolerance: float | None = None,
    eval: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fold an adapter into its base model (a plain transformers folder), or combine LoRA adapters into a new one.

    Args:
        adapter: Folder written by ``ftframe fit`` to merge (LoRA, DoRA, IA3, QLoRA, LoftQ; a full model folder is
            rewritten in ``dtype``). QLoRA / LoftQ adapters are merged onto their 4-bit base dequantized to float32.
        adapters: Two or more LoRA adapter folders to combine into one new adapter (instead of ``adapter``).
        output: Folder to write: a model folder (merge) or an adapter folder (combine).
        model: Base model; default: the base recorded in the adapter(s).
        dtype: dtype of the merged weights (merging itself runs in float32).
        combination: How ``adapters`` are combined (peft ``add_weighted_adapter``): ``linear`` / ``ties`` /
            ``dare_linear`` / ``dare_ties`` mix the A and B factors (equal ranks needed; fast, approximate), ``svd``
            and the ``*_svd`` variants mix the full updates ``B @ A`` and factor the result again (exact up to the
            rank kept), ``cat`` concatenates the factors (exact sum; rank = sum of ranks).
        weights: Weight of each adapter in ``adapters`` (default 1.0 each: every task's full update).
        density: ties / dare / magnitude_prune: fraction of each update's entries kept.
        svd_rank: svd variants: rank of the combined adapter (default: the largest input rank).
        seed: Random seed (DARE drops entries at random).
        prompts: Prompts for the logits check (default: four built-in ones, chat-templated).
        tolerance: Max abs logit difference allowed between the written model and the unmerged one (default by
            dtype: float32 1e-3, float16 0.15, bfloat16 1.0).
        eval: Evaluation gate YAML (see docs/merge.md): evaluate the result against the unmerged model(s) and refuse
            to write (or mark the output) when a metric drops more than allowed.
        overwrite: Replace ``output`` if it exists.
    """
    if (adapter is None) == (not adapters):
        raise UserError("pass either --adapter FOLDER (merge one adapter into its base) or --adapters A B ... "
                        "(combine LoRA adapters into one)")
    out = Path(output)
    _check_output(out, overwrite)
    from ftframe.tools.gate import EvalGate

    gate = EvalGate.from_file(eval) if eval else None
    if adapters:
        return combine(adapters, out, model=model, combination=combination, weights=weights, density=density,
                       svd_rank=svd_rank, seed=seed, prompts=prompts, gate=gate)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
    limit = TOLERANCE[dtype] if tolerance is None else tolerance
    started = time.perf_counter()
    if gate is not None:
        gate.prepare(adapter)  # read the gate's data now, not after merging
    print(f"[ftframe] merging {adapter} ...", flush=True)
    merged, tokenizer, details = merge_in_memory(adapter, model=model, dtype="float32")
    unmerged = details.pop("unmerged")
    print(f"[ftframe] {details['method']}: {details['note']}", flush=True)
    prompts = list(prompts or DEFAULT_PROMPTS)
    in_memory = logits_diff(merged, unmerged, tokenizer, prompts)  # the merge alone, in float32
    merged = merged.to(DTYPES[dtype])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(out, tmp, f"{out} was not written"):
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _copy_run_files(Path(adapter), tmp)
    del merged  # the check reads the written folder: at most two copies of the model in memory from here on
    try:
        reloaded = load_model(str(tmp), read_trained(adapter).auto_class()[0], dtype="float32")
        written = logits_diff(reloaded, unmerged, tokenizer, prompts)
        report = {**details, "dtype": dtype, "merge_logits": in_memory, "written_logits": written, "tolerance": limit,
                  "prompts": prompts}
        print(f"[ftframe] logits, written {dtype} model vs. unmerged base + adapter (float32): max abs diff "
              f"{written['max_abs_diff']:.3g} (logits up to {written['logit_scale']:.1f}; tolerance {limit:g}); top-1 "
              f"agreement {written['top1_agreement']:.2%} over {written['positions']} positions", flush=True)
        if written["max_abs_diff"] > limit:
            raise UserError(f"the merged model's logits differ from the unmerged model's by up to "
                            f"{written['max_abs_diff']:.3g} (tolerance {limit:g} for {dtype}); nothing was written. "
                            "A larger difference in float32 means the merge is wrong (report it); in 16 bits, "
                            "choose --dtype float32 or raise --tolerance")
        if gate is not None:
            result = gate.check((reloaded, tokenizer), (unmerged, tokenizer), tokenizer_source=str(tmp))
            report["eval_gate"] = result.as_dict()
            print(result.markdown(), flush=True)
            if not result.passed and gate.on_fail == "refuse":
                raise UserError(f"{result.markdown()}\nthe evaluation gate ({eval}) failed: nothing was written")
        report["seconds"] = time.perf_counter() - started
        (tmp / MERGE_REPORT).write_text(json.dumps(report, indent=2, default=str))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    failed = "eval_gate" in report and not report["eval_gate"]["passed"]
    print(f"[ftframe] merged model written to {out} ({report['seconds']:.1f} s)"
          + (" -- MARKED: the evaluation gate failed (see ftframe_merge.json)" if failed else ""), flush=True)
    return report


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise UserError(f"--output {out} exists; choose another folder or pass --overwrite true")
    check_writable(out, "--output")


def _copy_run_files(source: Path, dest: Path) -> None:
    """Carry the run's config and ftframe metadata along (they say how the model was trained)."""
    for name in ("config.yaml", METADATA_FILE):
        if (source / name).is_file():
            shutil.copy(source / name, dest / name)


def combine(
    adapters: list[str],
    out: Path,
    model: str | None = None,
    combination: str = "svd",
    weights: list[float] | None = None,
    density: float = 0.5,
    svd_rank: int | None = None,
    seed: int = 0,
    prompts: list[str] | None = None,
    gate: Any = None,
) -> dict[str, Any]:
    """Combine LoRA adapters into one new adapter at ``out`` (see :func:`merge`)."""
    from peft import PeftModel

    started = time.perf_counter()
    if combination not in COMBINATIONS:
        import difflib

        near = difflib.get_close_matches(str(combination), COMBINATIONS, n=1)
        raise UserError(f"--combination {combination!r} is unknown{f'; did you mean {near[0]!r}' if near else ''}; "
                        f"choose one of {list(COMBINATIONS)}")
    if len(adapters) < 2:
        raise UserError(f"--adapters needs two or more adapter folders to combine, got {adapters}; to merge one "
                        "adapter into its base use --adapter")
    infos = [read_trained(a, "--adapters") for a in adapters]
    for info in infos:
        if not info.is_peft or info.peft_config.get("peft_type") != "LORA" or info.peft_config.get("use_dora"):
            raise UserError(f"--adapters: {info.path} is a {info.method} adapter; combining works on LoRA adapters "
                            "(QLoRA's included), which peft's add_weighted_adapter mixes")
        if (info.metadata.get("hparams") or {}).get("init") == "loftq":
            raise UserError(f"--adapters: {info.path} is a LoftQ adapter: its factors start as a correction of the "
                            "4-bit base's quantization error, which every LoftQ adapter of that base carries; "
                            "combining them would apply that correction once per adapter. Combine plain LoRA / QLoRA "
                            "adapters")
    bases = {str(info.path): info.base for info in infos}
    if model is None and len(set(bases.values())) > 1:
        raise UserError(f"--adapters were trained on different bases {bases}: an adapter only fits the base it was "
                        "trained on. Combine adapters of one base (or pass --model if these names are the same model)")
    if weights is None:
        weights = [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise UserError(f"--weights has {len(weights)} values for {len(adapters)} adapters; give one per adapter")
    if not 0.0 < density <= 1.0:
        raise UserError(f"--density must be in (0, 1], got {density}")
    ranks = {str(info.path): info.peft_config.get("r") for info in infos}
    if combination in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune") and len(set(ranks.values())) > 1:
        raise UserError(f"--combination {combination} mixes the A and B factors entry by entry, which needs equal "
                        f"ranks; the adapters have r = {ranks}. Use --combination svd (or cat)")
    name = model or infos[0].base
    if not name:
        raise UserError(f"no base model recorded in {infos[0].path}; pass --model")
    if gate is not None:
        gate.prepare(str(infos[0].path))
    print(f"[ftframe] combining {len(adapters)} LoRA adapters ({combination}, weights {weights}) on {name} ...",
          flush=True)
    quantized = {json.dumps(info.quantization, sort_keys=True) for info in infos}
    if len(quantized) > 1:
        raise UserError("--adapters were trained on differently stored bases (some on a 4-bit base, some not, or 4-bit "
                        f"in different ways: {sorted(quantized)}): combine adapters trained on one base")
    cls = method_class(infos[0])
    names = [f"input{i}" for i in range(len(infos))]
    peft_model = cls.load_trained(infos[0], name, "float32")  # checks that the adapter fits the base
    peft_model.load_adapter(str(infos[0].path), adapter_name=names[0])
    peft_model.delete_adapter("default")
    for info, adapter_name in zip(infos[1:], names[1:], strict=True):
        try:
            peft_model.load_adapter(str(info.path), adapter_name=adapter_name)
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"--adapters: {info.path} does not fit the base {name!r}: "
                            f"{str(e).splitlines()[0][:300]}") from None
    torch.manual_seed(seed)
    try:
        # "default": peft saves the adapter of that name at the folder's top level, where from_pretrained looks
        # (reduced SVDs: the factors are cut to svd_rank anyway, and full ones cost minutes on a 135M model)
        peft_model.add_weighted_adapter(names, weights, "default", combination_type=combination,
                                        svd_rank=svd_rank, density=density, svd_full_matrices=False)
    except (ValueError, TypeError) as e:
        raise UserError(f"peft could not combine the adapters ({combination}): {e}") from None
    peft_model.set_adapter("default")
    peft_model.eval()
    tokenizer = load_tokenizer(str(infos[0].path) if (infos[0].path / "tokenizer_config.json").is_file() else name)
    report: dict[str, Any] = {"adapters": [str(p) for p in adapters], "base": name, "combination": combination,
                              "weights": weights, "density": density, "svd_rank": svd_rank, "seed": seed,
                              "ranks": ranks, "rank": peft_model.peft_config["default"].r}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(out, tmp, f"{out} was not written"), \
                mock.patch.dict("os.environ", {"HF_HUB_OFFLINE": "1"} if resolve_model(name) != name else {}):
            peft_model.save_pretrained(str(tmp), selected_adapters=["default"], safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
        if (infos[0].path / BASE_QUANTIZATION_FILE).is_file():  # QLoRA inputs: the result belongs to the same base
            shutil.copy(infos[0].path / BASE_QUANTIZATION_FILE, tmp / BASE_QUANTIZATION_FILE)
        metadata = dict(infos[0].metadata)
        metadata.update(combined=report, global_step=None, metrics={})  # method: the inputs' (LoRA / QLoRA)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
        # the written folder is what users get: load it with plain peft and check it computes the combined model
        reloaded = PeftModel.from_pretrained(cls.load_base(infos[0], name, "float32"), str(tmp)).eval()
        check = logits_diff(reloaded, peft_model, tokenizer, list(prompts or DEFAULT_PROMPTS))
        report["reload_logits"] = check
        print(f"[ftframe] written adapter reloaded with peft: max abs logit diff {check['max_abs_diff']:.3g} vs. the "
              "combined model in memory", flush=True)
        if check["max_abs_diff"] > TOLERANCE["float32"]:
            raise UserError(f"the written adapter reloads with logits {check['max_abs_diff']:.3g} away from the "
                            "combined model; nothing was written (a bug: please report it)")
        del reloaded
        if gate is not None:
            candidate = gate.score(peft_model, tokenizer, tokenizer_source=str(tmp))
            refs = {}
            for info, adapter_name in zip(infos, names, strict=True):
                peft_model.set_adapter(adapter_name)
                refs[str(info.path)] = gate.score(peft_model, tokenizer, tokenizer_source=str(tmp))
            peft_model.set_adapter("default")
            result = gate.compare(candidate, refs)
            report["eval_gate"] = result.as_dict()
            print(result.markdown(), flush=True)
            if not result.passed and gate.on_fail == "refuse":
                raise UserError(f"{result.markdown()}\nthe evaluation gate ({gate.source}) failed: nothing was "
                                "written")
        report["seconds"] = time.perf_counter() - started
        (tmp / MERGE_REPORT).write_text(json.dumps(report, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    print(f"[ftframe] combined adapter (r={report['rank']}) written to {out} ({report['seconds']:.1f} s)", flush=True)
    return report
