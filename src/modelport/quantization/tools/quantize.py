"""The `modelport quantize` pipeline: float HF folder + calibration text -> quantized folder.

load float model -> calibration windows (+ warnings) -> per-layer input statistics ->
per linear weight: AWQ scales + RTN, GPTQ, or FP8 -> public-layout checkpoint, with the
relative output error of every layer on its calibration inputs reported (and saved as
quantization_report.json next to the weights).

GPTQ's statistics come layer by layer from the model quantized so far (``sequential.py``,
the default) or, with ``sequential=False``, from one pass of the float model (``capture.py``),
which is how AWQ and FP8 always get theirs. A layer's reported error compares its float and
quantized weights on the inputs it was fitted to (in sequential mode, those of the partially
quantized model); it does not include the error that reaches it from the layers below.

With ``--reference-text`` (a sample of the traffic the model will serve), every layer's error
is also measured on that sample's inputs (from the float model), beside what plain
round-to-nearest at the same bits and group size gives there. A method fitted to calibration
text unlike the reference can beat rounding on the calibration inputs and lose to it on the
reference (GPTQ especially: it pushes each column's rounding error into directions the
calibration inputs do not use); the tool warns when that happens on many layers.

Mixture-of-experts models (per-expert calibration, RTN for experts calibration does not reach,
AWQ scales folded into the routers too) are described in ``moe_quant.py``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from modelport.quantization.tools.capture import HESSIAN_ROW_CLIP
from modelport.quantization.tools.writer import check_output, is_quantizable, write_checkpoint

if TYPE_CHECKING:
    from modelport.quantization.tools.capture import LayerStats

METHODS = ("awq", "gptq", "fp8")
# families whose norms cannot absorb AWQ's 1/s as a plain weight, and why
AWQ_UNFOLDABLE = {
    "GemmaForCausalLM": "stores as 1 + weight",
    "Gemma2ForCausalLM": "stores as 1 + weight (and sandwiches around attention)",
    "Gemma3ForCausalLM": "stores as 1 + weight (and sandwiches around attention)",
    "Gemma3ForConditionalGeneration": "stores as 1 + weight (and sandwiches around attention)",
    "Olmo2ForCausalLM": "applies after attention and the MLP (post-norm), not before",
}
GENERATED_CALIB = "calibration_from_model.jsonl"
REFERENCE_WINDOWS = 8  # windows of the reference sample whose inputs score every layer
# warn when at least this share of layers is worse than round-to-nearest on the reference
WORSE_THAN_RTN_WARN = 0.1
WORSE_MARGIN = 1.05  # "worse" is > 5 % above round-to-nearest's error, not a tie


@dataclass(frozen=True)
class QuantizeOptions:
    method: str
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    zero_point: bool = True  # asymmetric (AWQ default); False: symmetric (GPTQ "sym")
    num_samples: int = 128
    seq_len: int = 512
    reference_text: Path | None = None  # a sample of real traffic, for the relevance check
    device: str = "cpu"
    # GPTQ only: fit each linear to its inputs in the model quantized so far, layer by layer
    # (the paper's sequential mode, AutoGPTQ's true_sequential); False: one pass of the float
    # model gives every layer's inputs (AWQ always works so, like AutoAWQ and llm-awq)
    sequential: bool = True
    # GPTQ only: dampening added to the Hessian's diagonal, as a fraction of its mean
    # (AutoGPTQ's damp_percent); larger trusts the calibration inputs' correlations less
    damp_percent: float = 0.01
    # GPTQ only: in the Hessian, a token's input row longer than this many times its window's
    # median row counts at that length (massive activations; ``capture.LayerStats``); 0: off
    hessian_row_clip: float = HESSIAN_ROW_CLIP
    # AWQ / GPTQ: calibrate on text the model samples itself (``selfcalib``), num_samples
    # answers of up to seq_len tokens, instead of a --calib file
    calib_from_model: bool = False
    # MoE, GPTQ: an expert routed fewer calibration tokens than this is rounded to nearest
    # (AWQ: its down projection keeps scale 1); see moe_quant.py
    min_expert_tokens: int = 32

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "awq" and self.bits != 4:
            raise ValueError(f"AWQ: unsupported bit width {self.bits} (only 4)")
        if self.method == "gptq" and self.bits not in (4, 8):
            raise ValueError(f"GPTQ: unsupported bit width {self.bits}; supported: 4, 8")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 8):
            raise ValueError(f"--group-size must be -1 or a positive multiple of 8, got {self.group_size}")
        if self.method == "awq" and self.group_size == -1:
            # AutoAWQ's GEMM layout as vLLM and this loader read it keeps one scale and zero
            # per group of inputs; a -1 config is refused there
            raise ValueError("AWQ: --group-size -1 is not supported (the AutoAWQ GEMM layout "
                             "needs groups along the input: use 128, 64 or 32, or --method "
                             "gptq for one group per row)")
        if not 0 < self.damp_percent <= 10:
            raise ValueError(f"--damp-percent must be in (0, 10], got {self.damp_percent}")
        if self.hessian_row_clip != 0 and self.hessian_row_clip < 1:
            raise ValueError(f"--hessian-row-clip must be 0 (off) or >= 1, got {self.hessian_row_clip}")
        if self.calib_from_model and self.method == "fp8":
            raise ValueError("--calib-from-model: FP8 needs no calibration")
        if self.min_expert_tokens < 1:
            raise ValueError(f"--min-expert-tokens must be >= 1, got {self.min_expert_tokens}")
        if self.num_samples <= 0 or self.seq_len <= 1:
            raise ValueError("--num-samples must be > 0 and --seq-len > 1")


@dataclass
class QuantizeReport:
    output: Path
    options: dict = field(default_factory=dict)  # the QuantizeOptions it ran with
    warnings: list[str] = field(default_factory=list)
    layer_errors: dict[str, float] = field(default_factory=dict)  # HF weight name -> rel. error
    calibration_tokens: int = 0
    # GPTQ: HF weight name -> tokens whose Hessian row was shortened (``hessian_row_clip``)
    clipped_rows: dict[str, int] = field(default_factory=dict)
    # --calib-from-model: the texts the model wrote (saved as GENERATED_CALIB, --calib-able)
    generated_calibration: list[str] = field(default_factory=list)
    # with a reference sample: HF weight name -> (this method's, round-to-nearest's) relative
    # output error on the reference sample's inputs
    reference_errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    # MoE: expert weight names rounded to nearest for lack of routed calibration tokens
    # (GPTQ), or whose down projection kept AWQ scale 1, -> the tokens they got
    few_token_experts: dict[str, int] = field(default_factory=dict)

    def expert_errors(self) -> dict[str, dict[str, float]]:
        """MoE: per layer and projection (``...experts.*.down_proj``), mean / max over experts."""
        from modelport.quantization.tools.moe_quant import aggregate_expert_errors

        return aggregate_expert_errors(self.layer_errors)

    def to_json(self) -> dict:
        out = {"options": self.options, "warnings": self.warnings,
               "calibration_tokens": self.calibration_tokens,
               "layer_relative_output_error": self.layer_errors}
        if self.generated_calibration:
            out["calibration_from_model"] = GENERATED_CALIB
        if self.clipped_rows:
            out["hessian_clipped_rows"] = self.clipped_rows
        if self.expert_errors():
            out["expert_relative_output_error"] = self.expert_errors()
        if self.few_token_experts:
            out["few_token_experts"] = self.few_token_experts
        if self.reference_errors:
            out["reference_relative_output_error"] = {
                name: {"quantized": q, "round_to_nearest": r}
                for name, (q, r) in self.reference_errors.items()}
        return out

    def worse_than_rtn(self) -> list[str]:
        """Layers whose error on the reference sample exceeds round-to-nearest's by > 5 %."""
        return [n for n, (q, r) in self.reference_errors.items() if q > WORSE_MARGIN * r]


def reference_warning(report: QuantizeReport) -> str | None:
    """The warning for a quantization that fits its calibration text but not the reference."""
    worse = report.worse_than_rtn()
    if not report.reference_errors or len(worse) < WORSE_THAN_RTN_WARN * len(report.reference_errors):
        return None
    name = max(worse, key=lambda n: report.reference_errors[n][0] / max(report.reference_errors[n][1], 1e-12))
    q, r = report.reference_errors[name]
    return (f"on the reference sample {len(worse)} of {len(report.reference_errors)} layers have a "
            f"larger output error (by > 5 %) than plain round-to-nearest would give (worst: {name}, "
            f"{q:.4f} vs {r:.4f}): the calibration text does not represent the reference; "
            "calibrate on text like the traffic the model will serve")


def stats_key(hf_name: str) -> str:
    """HF weight name -> our fused module whose input it shares (q/k/v -> qkv_proj, ...)."""
    prefix = hf_name.removesuffix(".weight")
    prefix = re.sub(r"(\.experts\.\d+)\.w[13]$", r"\1.gate_up_proj", prefix)  # Mixtral
    prefix = re.sub(r"(\.experts\.\d+)\.w2$", r"\1.down_proj", prefix)
    prefix = re.sub(r"\.(q|k|v)_proj$", ".qkv_proj", prefix)
    return re.sub(r"\.(gate|up)_proj$", ".gate_up_proj", prefix)


def _rel_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    y = x @ w.t().float()
    return ((x @ w_hat.t().float() - y).norm() / y.norm().clamp(min=1e-12)).item()


def _tokenize(model_dir: Path, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def quantize_model(model: str, output: Path, calib: Path | None, opts: QuantizeOptions,
                   progress: bool = True) -> QuantizeReport:
    from tqdm.auto import tqdm

    from modelport.config import LoadConfig
    from modelport.loader import hf, load_model, load_model_config, resolve_model
    from modelport.quantization.tools import calib as calib_mod
    from modelport.quantization.tools.capture import collect_stats

    src = resolve_model(model)
    if src.kind != "hf":
        raise ValueError("quantize needs an HF folder (config.json + *.safetensors), not a GGUF file")
    mcfg = load_model_config(src)
    if mcfg.hf_config.get("quantization_config"):
        raise ValueError(f"{src.path} is already quantized; start from the float checkpoint")
    from modelport.models.moe_config import MOE_ARCHITECTURES
    from modelport.quantization.tools import moe_quant

    moe = mcfg.architecture in MOE_ARCHITECTURES
    expert_names = moe_quant.expert_names(mcfg.architecture)
    if not moe and opts.min_expert_tokens != moe_quant.MIN_EXPERT_TOKENS:
        raise ValueError(f"--min-expert-tokens applies to MoE models only; {mcfg.architecture} "
                         "has no experts")
    if opts.method == "awq" and mcfg.architecture in AWQ_UNFOLDABLE:
        raise ValueError(f"--method awq does not support {mcfg.architecture}: its scales fold into "
                         "the RMSNorm before q/k/v and gate/up, which this family "
                         f"{AWQ_UNFOLDABLE[mcfg.architecture]}; use --method gptq or fp8")
    if calib is not None and opts.calib_from_model:
        raise ValueError("give either --calib or --calib-from-model, not both")
    if calib is None and opts.method != "fp8" and not opts.calib_from_model:
        raise ValueError(f"--calib (or --calib-from-model) is required for {opts.method} (FP8 "
                         "needs no calibration)")
    # the output, the device and the text files are checked before the weights load
    check_output(src.path, Path(output))
    if not moe:  # an MoE model refuses any device but the CPU (moe_quant.load_for_calibration)
        _check_device(opts.device)
    texts: list[str] | None = calib_mod.read_texts(calib) if calib is not None else None
    ref_texts = (calib_mod.read_texts(opts.reference_text, "--reference-text file")
                 if opts.reference_text is not None else None)
    # calibration windows fit the model's positions (its rotary table ends there)
    seq_len = min(opts.seq_len, mcfg.max_position_embeddings)
    report = QuantizeReport(Path(output), options={
        k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()})
    if seq_len < opts.seq_len and (texts is not None or opts.calib_from_model):
        short = (f"--seq-len {opts.seq_len} is longer than the model's context "
                 f"({mcfg.max_position_embeddings} positions): calibration windows hold "
                 f"{seq_len} tokens")
        calib_mod.logger.warning(short)
        report.warnings.append(short)
    weights = {n: t.float() for n, t in hf.iter_safetensors(hf.safetensors_files(src.path))}
    if moe:
        moe_quant.split_stacked_experts(weights, expert_names)
    names = [n for n in weights if is_quantizable(n)]
    check_group_size(weights, names, opts)
    fused = _fused_checkpoint(names, weights, mcfg)
    # AWQ folds its scales into ``weights``; errors are always against the checkpoint's weights
    originals = {n: weights[n].clone() for n in names} if opts.method == "awq" else weights
    out: dict[str, torch.Tensor] = {}  # checkpoint tensors; the float ones are added last

    def emit(name: str, st: LayerStats | None) -> torch.Tensor:
        """Quantize one weight into ``out``, report its error on its calibration inputs, and
        return its dequantization (what the sequential mode continues with)."""
        few = (moe and opts.method == "gptq" and st is not None and moe_quant.is_expert(name)
               and st.rows < opts.min_expert_tokens)
        if few:  # too few routed tokens for a Hessian: round to nearest
            report.few_token_experts[name] = st.rows
        w, w_hat, tensors = _quantize_one(name, weights[name], st, opts, rtn=few)
        prefix = name.removesuffix(".weight")
        out.update({f"{prefix}.{k}": v for k, v in tensors.items()})
        if st is not None and st.rows > 0:
            if opts.method == "awq":  # compare the effective weight with the original one
                w_hat = w_hat * (originals[name] / w.where(w != 0, torch.ones_like(w))).where(
                    w != 0, torch.zeros_like(w))
            report.layer_errors[name] = _rel_error(st.x_sample, originals[name], w_hat)
            if st.clipped_rows:
                report.clipped_rows[name] = st.clipped_rows
        if ref_stats is not None and ref_stats[stats_key(name)].rows > 0:
            x_ref = ref_stats[stats_key(name)].x_sample
            report.reference_errors[name] = (_rel_error(x_ref, originals[name], w_hat),
                                             _rel_error(x_ref, originals[name], _rtn(originals[name], opts)))
        bar.update(1)
        return w_hat

    ref_stats: dict[str, LayerStats] | None = None
    if texts is None and opts.calib_from_model:
        from modelport.quantization.tools.selfcalib import generate_calibration

        texts = generate_calibration(str(src.path), opts.num_samples, seq_len, opts.device,
                                     progress=progress)
        report.generated_calibration = texts
    # after the model has written its calibration text (that has bars of its own)
    bar = tqdm(total=len(names), desc=f"Quantizing ({opts.method})", unit="layer",
               disable=not progress)
    if texts is None:
        for name in names:
            emit(name, None)
    else:
        windows = calib_mod.make_windows(_tokenize(src.path, texts), opts.num_samples, seq_len)
        ref = None
        if ref_texts is not None:
            ref = [t for ids in _tokenize(src.path, ref_texts) for t in ids]
        report.warnings += calib_mod.calibration_warnings(windows, opts.num_samples, seq_len, ref)
        report.calibration_tokens = sum(len(w) for w in windows)
        float_model = (moe_quant.load_for_calibration(src, mcfg, opts.device) if moe else
                       load_model(src, mcfg, LoadConfig(), torch.float32, torch.device(opts.device)))
        if ref is not None and opts.method != "fp8":  # before sequential GPTQ changes the model
            ref_stats = collect_stats(float_model, calib_mod.make_windows(
                [ref], REFERENCE_WINDOWS, seq_len), hessian=False)
        if opts.method == "gptq" and opts.sequential and moe:
            mismatch = set(names) ^ set(moe_quant.layerwise_weight_names(float_model, expert_names))
            if mismatch:
                raise ValueError("sequential GPTQ: the checkpoint's linear weights and the "
                                 f"model's differ: {sorted(mismatch)}")
            moe_quant.quantize_layerwise(float_model, windows, emit, expert_names,
                                         row_clip=opts.hessian_row_clip)
            del float_model
        elif opts.method == "gptq" and opts.sequential:
            from modelport.quantization.tools.sequential import (
                layerwise_weight_names,
                quantize_layerwise,
            )

            mismatch = set(names) ^ set(layerwise_weight_names(float_model, fused))
            if mismatch:
                raise ValueError("sequential GPTQ: the checkpoint's linear weights and the "
                                 f"model's differ: {sorted(mismatch)}")
            quantize_layerwise(float_model, windows, emit, row_clip=opts.hessian_row_clip,
                               fused=fused)
            del float_model
        else:
            stats = collect_stats(float_model, windows, hessian=opts.method == "gptq",
                                  row_clip=opts.hessian_row_clip)
            del float_model
            if opts.method == "awq":
                from modelport.quantization.tools.awq_algo import (
                    apply_awq_scales,
                    fused_scale_groups,
                    scale_groups,
                )

                n, heads, kv = (mcfg.num_hidden_layers, mcfg.num_attention_heads,
                                mcfg.num_key_value_heads)
                groups = (fused_scale_groups(n, heads, kv, mcfg.head_dim, mcfg.intermediate_size)
                          if fused else scale_groups(n, heads, kv))
                if moe:
                    groups, report.few_token_experts = moe_quant.awq_groups(
                        weights, mcfg, stats, expert_names, opts.min_expert_tokens)
                apply_awq_scales(weights, stats, groups, opts.bits, opts.group_size,
                                 opts.zero_point)
            for name in names:
                emit(name, stats[stats_key(name)])
    bar.close()
    few = moe_quant.few_tokens_warning(report.few_token_experts, opts.min_expert_tokens,
                                       opts.method)
    if few is not None:
        calib_mod.logger.warning(few)
        report.warnings.append(few)
    warning = reference_warning(report)
    if warning is not None:
        calib_mod.logger.warning(warning)
        report.warnings.append(warning)
    # after AWQ has folded its inverse scales into the norms and the other float tensors
    out.update({n: w for n, w in weights.items() if not is_quantizable(n)})
    write_checkpoint(src.path, report.output, out, _hf_config(opts, out),
                     float_dtype=torch.float16 if opts.method != "fp8" else torch.bfloat16)
    (report.output / "quantization_report.json").write_text(json.dumps(report.to_json(), indent=2))
    generated = report.output / GENERATED_CALIB
    if report.generated_calibration:
        generated.write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in report.generated_calibration))
    elif generated.is_file():  # an earlier run's texts would pass for this checkpoint's
        generated.unlink()
    return report


def _check_device(device: str) -> None:
    """--device names cpu or an available CUDA device (not a torch assertion mid-run)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")


def _fused_checkpoint(names: list[str], weights: dict[str, torch.Tensor], mcfg) -> bool:  # noqa: ANN001
    """Whether the checkpoint stores qkv_proj / gate_up_proj fused (Phi-3) rather than split
    (Llama, Qwen2); a mix, or fused tensors of unexpected shape, is refused."""
    fused = [n for n in names if n.endswith((".qkv_proj.weight", ".gate_up_proj.weight"))]
    if not fused:
        return False
    split = [n for n in names if n.endswith((".q_proj.weight", ".gate_proj.weight"))]
    if split:
        raise ValueError(f"the checkpoint stores both fused ({fused[0]}) and split ({split[0]}) "
                         "projections; quantize supports one layout per model")
    q = mcfg.num_attention_heads * mcfg.head_dim
    rows = {"qkv_proj": q + 2 * mcfg.num_key_value_heads * mcfg.head_dim,
            "gate_up_proj": 2 * mcfg.intermediate_size}
    for n in fused:
        want = rows[n.rsplit(".", 2)[1]]
        if weights[n].shape[0] != want:
            raise ValueError(f"{n} has {weights[n].shape[0]} rows; the config gives {want} "
                             "(q+k+v heads x head_dim, or 2 x intermediate_size)")
    return True


def check_group_size(weights: dict[str, torch.Tensor], names: list[str], opts: QuantizeOptions) -> None:
    """Before any calibration: every layer's input size must hold whole groups."""
    g = opts.group_size
    if opts.method == "fp8" or g == -1:
        return
    bad = [n for n in names if weights[n].shape[1] % g]
    if not bad:
        return
    fits = [c for c in (128, 64, 32) if c < g and all(weights[n].shape[1] % c == 0 for n in names)]
    if fits:
        hint = f"--group-size {fits[0]}"
    else:  # AWQ takes no -1 (QuantizeOptions)
        hint = ("--group-size -1 (one group per row)" if opts.method != "awq"
                else "--method gptq --group-size -1 (one group per row)")
    raise ValueError(
        f"--group-size {g} does not divide the input size of {len(bad)} layer(s), e.g. {bad[0]} "
        f"(input size {weights[bad[0]].shape[1]}); use {hint}")


def fp8_ignore(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The linear modules an FP8 checkpoint leaves in float, for compressed-tensors' ``ignore``
    (its ``targets: ["Linear"]`` names every linear layer): the LM head (whether stored or tied
    to the embedding) and the MoE routers (``mlp.gate``, ``block_sparse_moe.gate``,
    ``shared_expert_gate``), the linear layers ``is_quantizable`` leaves out."""
    routers = sorted({n.removesuffix(".weight") for n, t in tensors.items()
                      if n.endswith(".weight") and t.dim() == 2
                      and n.removesuffix(".weight").rsplit(".", 1)[-1].endswith("gate")
                      and not is_quantizable(n)})
    return ["lm_head", *routers]


def _hf_config(opts: QuantizeOptions, tensors: dict[str, torch.Tensor] | None = None):  # noqa: ANN202
    """The config written: AWQ / GPTQ's, or for FP8 compressed-tensors' FP8_DYNAMIC layout
    (``tensors``, the checkpoint's, give its ``ignore`` list)."""
    if opts.method == "awq":
        from modelport.quantization.awq import AWQConfig

        return AWQConfig(bits=opts.bits, group_size=opts.group_size, zero_point=opts.zero_point)
    if opts.method == "gptq":
        from modelport.quantization.gptq import GPTQConfig

        return GPTQConfig(bits=opts.bits, group_size=opts.group_size, desc_act=opts.desc_act,
                          sym=not opts.zero_point, true_sequential=opts.sequential,
                          damp_percent=opts.damp_percent)
    from modelport.quantization.fp8 import CompressedTensorsFP8Config

    return CompressedTensorsFP8Config(ignore=tuple(fp8_ignore(tensors or {})))


def _rtn(w: torch.Tensor, opts: QuantizeOptions) -> torch.Tensor:
    """The plain round-to-nearest weight at the options' bits, group size and symmetry."""
    from modelport.quantization.tools.rtn import dequantize_codes, rtn_quantize

    k = w.shape[1]
    g = k if opts.group_size == -1 else opts.group_size
    return dequantize_codes(*rtn_quantize(w, opts.bits, g, sym=not opts.zero_point),
                            torch.arange(k) // g)


def _quantize_one(name: str, w: torch.Tensor, st: LayerStats | None, opts: QuantizeOptions,
                  rtn: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(weight that was quantized, its dequantization, checkpoint tensors) for one linear.
    ``rtn``: GPTQ's layout, but plain rounding (an MoE expert without calibration tokens)."""
    from modelport.quantization.tools.rtn import dequantize_codes, rtn_quantize

    k = w.shape[1]
    g = k if opts.group_size == -1 else opts.group_size
    if opts.method == "fp8":
        from modelport.quantization.fp8 import quantize_fp8_per_channel

        q, scale = quantize_fp8_per_channel(w)  # compressed-tensors' channel scales: [out, 1]
        return w, q.float() * scale[:, None], {"weight": q, "weight_scale": scale[:, None]}
    if k % g:
        raise ValueError(f"{name}: input size {k} is not a multiple of --group-size {g}")
    if opts.method == "awq":
        from modelport.quantization.awq import pack_awq

        codes, zeros, scales = rtn_quantize(w, opts.bits, g, sym=not opts.zero_point)
        return w, dequantize_codes(codes, zeros, scales, torch.arange(k) // g), pack_awq(codes, zeros, scales)
    from modelport.quantization.gptq import pack_gptq
    from modelport.quantization.tools.gptq_algo import gptq_quantize

    if rtn:
        codes, zeros, scales = rtn_quantize(w, opts.bits, g, sym=not opts.zero_point)
        g_idx = (torch.arange(k) // g).to(torch.int32)
        return (w, dequantize_codes(codes, zeros, scales, g_idx.long()),
                pack_gptq(codes, zeros, scales, opts.bits, g_idx=g_idx))
    if st is None or st.hessian is None:
        raise ValueError(f"{name}: GPTQ needs the Hessian of the layer's calibration inputs")
    codes, zeros, scales, g_idx = gptq_quantize(w, st.hessian, opts.bits, g,
                                                sym=not opts.zero_point, act_order=opts.desc_act,
                                                damp=opts.damp_percent)
    deq = dequantize_codes(codes, zeros, scales, g_idx.long())
    return w, deq, pack_gptq(codes, zeros, scales, opts.bits, g_idx=g_idx)
