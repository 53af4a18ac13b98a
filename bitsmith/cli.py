"""The `bitsmith` command line, calling the public API only. Errors become one line and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .errors import BitsmithError

log = logging.getLogger("bitsmith")
DEFAULT_MODEL = "smollm2-135m"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        self.exit(2, f"bitsmith: error: {message} (see `{self.prog} --help`)\n")


# ---- argument types ----------------------------------------------------------------------------------
def _bits(text: str) -> int:
    try:
        b = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bits takes an integer from 1 to 8, got {text!r}") from None
    if not 1 <= b <= 8:
        raise argparse.ArgumentTypeError(f"--bits takes an integer from 1 to 8, got {b}")
    return b


def _alpha(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        a = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--smoothquant takes an alpha in [0, 1] or 'auto', got {text!r}") from None
    if not 0.0 <= a <= 1.0:
        raise argparse.ArgumentTypeError(f"--smoothquant takes an alpha in [0, 1] or 'auto', got {a}")
    return a


def _group_size(text: str) -> int | None:
    try:
        g = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--group-size takes a positive integer or -1, got {text!r}") from None
    if g == -1:
        return None
    if g < 1:
        raise argparse.ArgumentTypeError(f"--group-size takes a positive integer or -1 (per-channel), got {g}")
    return g


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


# ---- commands ----------------------------------------------------------------------------------------
def cmd_quantize(a: argparse.Namespace) -> int:
    from . import checkpoint, methods
    from .apply import quantize_model
    from .recipe import Recipe, Scheme
    from .size import size_report

    if a.recipe and a.gguf_compatible:
        raise BitsmithError("--gguf-compatible sets the scheme; pass it or --recipe, not both")
    if a.recipe:
        recipe = Recipe.from_yaml(a.recipe)
    else:
        if a.method not in methods.names():
            raise BitsmithError(f"unknown method {a.method!r}; valid methods: {', '.join(methods.names())}")
        args = {"mse": True} if a.mse_clip else {}
        if a.act_order is not None:              # GPTQ's default is on; --no-act-order turns it off
            args["act_order"] = a.act_order
        if a.static_groups is not None:
            args["static_groups"] = a.static_groups
        if a.damp is not None:
            args["damp"] = a.damp
        args.update(_w8a8_args(a))
        bits = a.bits if a.bits is not None else (8 if a.method == "w8a8" else 4)
        scheme = Scheme(bits=bits, group_size=a.group_size, symmetric=a.sym, grid=a.grid)
        if a.method == "w8a8":      # weights are symmetric per output channel (W8A8; --bits 4: W4A8)
            scheme = Scheme(bits=bits, group_size=None, symmetric=True)
        if a.gguf_compatible:       # the GGUF type's own grid, so `bitsmith export --format gguf` repacks losslessly
            from .export.gguf_blocks import gguf_scheme

            scheme = gguf_scheme(a.gguf_compatible.upper())
        recipe = Recipe(method=a.method, scheme=scheme, targets=tuple(a.targets or ("*",)),
                        ignore=tuple(a.ignore) if a.ignore is not None else Recipe().ignore,
                        method_args=args, seed=a.seed)
    out = Path(a.output)
    checkpoint.check_output(out, a.overwrite)          # fail before loading anything
    lm = _load(a.model)
    t0 = time.perf_counter()
    calib = {}
    if recipe.method in methods.METHODS and methods.get(recipe.method).NEEDS:
        from .models import load_text

        calib = {"tokenizer": lm.tokenizer, "calib_text": load_text(a.calib_text)[0],
                 "n_samples": a.calib_samples, "seq_len": a.calib_seq_len}
    report = quantize_model(lm.model, recipe, progress=not a.json, **calib)
    seconds = time.perf_counter() - t0
    extra = {"recipe.yaml": recipe.to_yaml(), "quant_report.json": json.dumps(
        {"seconds": seconds, "layers": report}, indent=2) + "\n"}
    checkpoint.save(lm.model, out, tokenizer=lm.tokenizer, source_dir=lm.source_dir, overwrite=a.overwrite,
                    extra_files=extra)
    size = size_report(lm.model)
    from .size import file_bytes

    summary = {"output": str(out), "method": recipe.method, "scheme": recipe.scheme.label(),
               "layers": len(report), "seconds": round(seconds, 2), "file_bytes": file_bytes(out),
               "bits_per_weight": size["bits_per_weight"], "quantized_bpw": size["quantized_bpw"]}
    if a.json:
        print(json.dumps(summary))
    else:
        print(f"quantized {summary['layers']} layers of {a.model} with {recipe.method} {recipe.scheme.label()} "
              f"in {seconds:.1f} s -> {out}")
        print(f"file {_mb(summary['file_bytes'])}, {size['bits_per_weight']:.3f} bits/weight overall, "
              f"{(size['quantized_bpw'] or 0):.3f} in quantized layers")
    return 0


def _w8a8_args(a: argparse.Namespace) -> dict:
    """method_args of the activation-quantization flags; an error when they are given to another method."""
    args = {}
    if a.observer is not None:
        args["observer"] = a.observer
    if a.smoothquant is not None:
        args["smoothquant"] = a.smoothquant
    if a.dynamic:
        args["dynamic"] = True
    if a.reduce_range:
        args["reduce_range"] = True
    if args and a.method != "w8a8":
        raise BitsmithError(f"--observer/--smoothquant/--dynamic/--reduce-range belong to --method w8a8, "
                            f"not {a.method}")
    return args


def cmd_eval(a: argparse.Namespace) -> int:
    from .evaluate import eval_windows, generate_texts, score_windows
    from .models import chat_prompt_ids, load_text
    from .size import file_bytes, size_report

    if a.wikitext2:
        from .evaluate import WIKITEXT2_SEQ_LEN, wikitext2_text

        if a.text:
            raise BitsmithError("--text and --wikitext2 both name the evaluation text; pass one of them")

        eval_text = wikitext2_text(a.wikitext2)         # fail before loading the model
        a.seq_len, a.max_tokens = a.seq_len or WIKITEXT2_SEQ_LEN, None
    lm = _load(a.model)
    if not a.wikitext2:
        eval_text = load_text(a.text)[1]
    size = size_report(lm.model)
    result: dict = {"model": a.model}
    if lm.kind == "causal-lm":
        windows = eval_windows(lm.tokenizer, eval_text, seq_len=a.seq_len or 1024, max_tokens=a.max_tokens)
        result["protocol"] = "wikitext2" if a.wikitext2 else "default"
        ref = None
        if a.kl_ref:
            ref_lm = _load(a.kl_ref)
            if ref_lm.kind != "causal-lm":
                raise BitsmithError(f"--kl-ref {a.kl_ref} is an {ref_lm.kind}, not a causal language model")
            ref = _lazy_logprobs(ref_lm.model, windows)
            result["kl_ref"] = a.kl_ref
        result.update(score_windows(lm.model, windows, ref, progress=not a.json))
        if a.generate:
            prompts = a.prompt or list(_default_prompts())
            ids = [chat_prompt_ids(lm.tokenizer, p) for p in prompts]
            texts = generate_texts(lm.model, lm.tokenizer, ids, a.max_new_tokens)
            result["generations"] = [{"prompt": p, "output": t} for p, t in zip(prompts, texts)]
    else:
        result["note"] = f"perplexity needs a causal language model; {a.model} is an {lm.kind}"
        if a.kl_ref:
            from .evaluate import embed, embedding_scores, retrieval_pairs

            ref_lm = _load(a.kl_ref)
            q, d = retrieval_pairs(eval_text)
            result.update(embedding_scores(embed(lm.model, lm.tokenizer, q), embed(lm.model, lm.tokenizer, d),
                                           embed(ref_lm.model, ref_lm.tokenizer, q),
                                           embed(ref_lm.model, ref_lm.tokenizer, d)))
            result["kl_ref"] = a.kl_ref
    on_disk = lm.source_dir is not None and _is_checkpoint(lm.source_dir)
    result.update({"size_bytes": file_bytes(lm.source_dir) if on_disk else size["payload_bytes"],
                   "size_source": "file" if on_disk else "tensors", "memory_bytes": size["memory_bytes"],
                   "bits_per_weight": size["bits_per_weight"], "weights": size["weights"]})
    if a.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            if k == "generations":
                for g in v:
                    print(f"{'prompt':>16}: {g['prompt']}\n{'output':>16}: {g['output']}")
                continue
            print(f"{k:>16}: {v:.4f}" if isinstance(v, float) else f"{k:>16}: {v}")
    return 0


def _lazy_logprobs(model, windows):
    from .evaluate import window_logprobs

    for w in windows:        # one window at a time: nothing like W x L x V stays in memory
        yield window_logprobs(model, w)


def _default_prompts() -> tuple[str, ...]:
    from .compare import PROMPTS

    return PROMPTS


def cmd_inspect(a: argparse.Namespace) -> int:
    from .inspect import inspect_checkpoint, render

    info = inspect_checkpoint(a.dir)
    print(json.dumps(info, indent=2) if a.json else render(info))
    return 0


def cmd_env(a: argparse.Namespace) -> int:
    from .env import environment, render

    info = environment()
    print(json.dumps(info, indent=2) if a.json else render(info))
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from .compare import Settings, run_compare
    from .report import text_table, write_report

    try:
        bits = [_bits(b.strip()) for b in a.bits.split(",") if b.strip()] if a.bits else None
    except argparse.ArgumentTypeError as e:
        raise BitsmithError(str(e)) from None
    baselines = [b for b in a.baselines.split(",") if b.strip()] if a.baselines else None
    settings = Settings(model=a.model or DEFAULT_MODEL, text=a.text, seq_len=a.seq_len, max_tokens=a.max_tokens,
                        calib_samples=a.calib_samples, calib_seq_len=a.calib_seq_len,
                        gen_tokens=a.gen_tokens)
    t0 = time.perf_counter()
    result = run_compare(methods=a.methods, bits=bits, group_size=a.group_size, output=a.output, resume=a.resume,
                         overwrite=a.overwrite, baselines=baselines, settings=settings, progress=not a.json)
    paths = write_report(a.output, result, a.max_dppl)
    rec = json.loads(Path(paths["report.json"]).read_text(encoding="utf-8"))["recommendation"]
    wall = time.perf_counter() - t0
    if a.json:
        print(json.dumps({"rows": result["rows"], "notes": result["notes"], "resumed": result["resumed"],
                          "computed": result["computed"], "recommendation": rec, "wall_seconds": round(wall, 1),
                          "report": {k: str(v) for k, v in paths.items()}}, default=str))
        return 0
    print(text_table(result["rows"]))
    print()
    print(rec["text"])
    for n in result["notes"]:
        print(f"note: {n}")
    print(f"{result['computed']} configuration(s) computed, {result['resumed']} resumed from {a.output}; "
          f"{wall:.0f} s. Report: {paths['report.html']} (also report.md, report.json)")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .export import check_options, check_output, export, format_module

    mod = format_module(a.format)                     # unknown format / missing extra: fail before loading
    options = {k: v for k, v in (("type", a.type),) if v is not None}
    for item in a.option or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BitsmithError(f"--option takes KEY=VALUE, got {item!r}")
        options[key.replace("-", "_")] = value
    check_options(mod, a.format, options)
    out = Path(a.output)
    check_output(out, a.overwrite, bool(mod.OUTPUT_IS_DIR))
    from .importers import load_for_export
    from .models import quiet_transformers

    quiet_transformers()
    lm = load_for_export(a.model)     # GGUF / GPTQ sources keep their codes (no float round trip)
    summary = export(lm, a.format, out, overwrite=a.overwrite, **options)
    if a.json:
        print(json.dumps(summary, default=str))
    else:
        print(f"exported {a.model} as {a.format} -> {out} ({_mb(summary['bytes'])})")
        for w in summary.get("warnings", []):
            print(f"warning: {w}")
    return 0


# ---- plumbing ----------------------------------------------------------------------------------------
def _load(spec: str):
    from .models import load_any, quiet_transformers

    quiet_transformers()   # our own progress bars and errors only

    return load_any(spec)


def _is_checkpoint(path) -> bool:
    from .checkpoint import is_checkpoint

    return is_checkpoint(path)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bitsmith", description="Quantize models, measure what it cost, export to runtimes.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize a model and save it")
    q.add_argument("model", help="bundled name (smollm2-135m, minilm-l6), HF directory, .gguf file or hub id")
    q.add_argument("--method", default="rtn", help="quantization method (default rtn)")
    q.add_argument("--bits", type=_bits, default=None, help="bits per weight, 1..8 (default 4; 8 for w8a8)")
    q.add_argument("--group-size", type=_group_size, default=None,
                   help="input features per scale; -1 = per output channel (default)")
    q.add_argument("--sym", action="store_true", help="symmetric grid (no zero point)")
    q.add_argument("--grid", default="int", help="int, nf4, fp4, fp8_e4m3, fp8_e5m2, binary, ternary")
    q.add_argument("--gguf-compatible", metavar="TYPE", help="quantize on GGUF type TYPE's grid (Q4_0, Q4_1, "
                   "Q5_0, Q5_1, Q8_0: block 32, f16 scales) so a GGUF export keeps the codes; overrides "
                   "--bits/--group-size/--sym")
    q.add_argument("--mse-clip", action="store_true", help="RTN and GPTQ: search clipping ranges minimising MSE "
                   "(GPTQ: per group as the solve reaches it; the default at <= 3 bits)")
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: quantize columns by descending Hessian diagonal (the default; --no-act-order for "
                   "the plain column order)")
    q.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: group parameters from the original weight, so act-order needs no stored "
                   "permutation (the default above 3 bits; every export format loads it)")
    q.add_argument("--damp", type=float, default=None, help="GPTQ: damping as a fraction of the mean diagonal (0.01)")
    q.add_argument("--observer", choices=("minmax", "ema", "percentile", "mse", "entropy"), default=None,
                   help="w8a8: how static activation ranges are chosen from calibration (default minmax)")
    q.add_argument("--smoothquant", type=_alpha, default=None, metavar="ALPHA",
                   help="w8a8: SmoothQuant with migration strength ALPHA in [0, 1] (e.g. 0.5), or 'auto' "
                   "(alpha searched per layer group on its output error; run-time smoothing where no fold)")
    q.add_argument("--dynamic", action="store_true", help="w8a8: per-token activation scales at run time")
    q.add_argument("--reduce-range", action="store_true",
                   help="w8a8: weights in [-64, 64] (single-pass int8 product on CPUs without VNNI)")
    q.add_argument("--calib-text", help="UTF-8 text for calibration (default: the Python docs, calibration part)")
    q.add_argument("--calib-samples", type=_positive, default=128, help="calibration samples (default 128)")
    q.add_argument("--calib-seq-len", type=_positive, default=512, help="tokens per calibration sample (default 512)")
    q.add_argument("--targets", nargs="+", help="glob or re: patterns of modules to quantize (default all linears)")
    q.add_argument("--ignore", nargs="*", help="patterns of modules to keep (default lm_head)")
    q.add_argument("--recipe", help="YAML recipe (overrides the method/scheme flags)")
    q.add_argument("--output", "-o", required=True, help="output directory")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity, size and bits per weight of a model or checkpoint")
    e.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    e.add_argument("--text", help="UTF-8 text file (default: the Python docs, held-out part)")
    e.add_argument("--seq-len", type=_positive, default=None, help="tokens per window (default 1024; 2048 "
                                                                        "with --wikitext2)")
    e.add_argument("--max-tokens", type=_positive, default=4096, help="tokens scored (default 4096)")
    e.add_argument("--wikitext2", metavar="FILE", help="GPTQ's WikiText-2 protocol on your copy of wiki.test.raw: "
                                                       "rows joined by blank lines, every window of 2048 tokens")
    e.add_argument("--kl-ref", metavar="MODEL",
                   help="reference model (e.g. the unquantized one): adds KL divergence and top-1 agreement")
    e.add_argument("--generate", action="store_true", help="greedy generations for a few prompts")
    e.add_argument("--prompt", action="append", help="a prompt for --generate (repeatable)")
    e.add_argument("--max-new-tokens", type=_positive, default=24)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("inspect", help="per-layer table of a quantized checkpoint")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    v = sub.add_parser("env", help="versions, devices and which optional parts are usable")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_env)

    c = sub.add_parser("compare", help="quantize one model many ways; table, plots and a recommendation")
    c.add_argument("model", nargs="?", default=None, help=f"default {DEFAULT_MODEL}")
    c.add_argument("--methods", help="comma-separated, NAME or NAME@BITS (default: rtn, gptq, awq, hqq, ... "
                                     "as installed, each at the bits it is useful at)")
    c.add_argument("--bits", help="comma-separated bits, e.g. 8,4,3 (default: per method)")
    c.add_argument("--group-size", type=_group_size, default=64, help="group size below 8 bits; -1 per channel")
    c.add_argument("--output", "-o", default="out/compare", help="report and cache directory (default out/compare)")
    c.add_argument("--resume", action="store_true", help="skip configurations already finished in --output")
    c.add_argument("--overwrite", action="store_true", help="recompute into an --output that holds a comparison")
    c.add_argument("--max-dppl", type=float, default=5.0, help="quality budget for the recommendation, in %% dPPL")
    c.add_argument("--baselines", help="comma-separated: quanto, hqq, torchao, llamacpp (installed ones)")
    c.add_argument("--text", help="UTF-8 text file (default: the Python docs; calibration/held-out split)")
    c.add_argument("--seq-len", type=_positive, default=1024)
    c.add_argument("--max-tokens", type=_positive, default=4096)
    c.add_argument("--calib-samples", type=_positive, default=32, help="calibration samples (default 32)")
    c.add_argument("--calib-seq-len", type=_positive, default=512)
    c.add_argument("--gen-tokens", type=int, default=16, help="greedy tokens per prompt; 0 = no generations")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_compare)

    x = sub.add_parser("export", help="write a model or checkpoint as GGUF, ONNX, compressed-tensors or MLX")
    x.add_argument("model", help="bitsmith checkpoint directory, bundled name, HF directory or .gguf file")
    x.add_argument("--format", "-f", required=True, help="gguf, onnx, compressed-tensors or mlx")
    x.add_argument("--output", "-o", required=True, help="output file (gguf) or directory")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output")
    x.add_argument("--type", help="GGUF tensor type: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K_M, Q4_K, Q5_K_M, Q5_K, "
                                  "Q6_K, F16, BF16, F32 (default: what the quantized layers are)")
    x.add_argument("--option", action="append", metavar="KEY=VALUE", help="a format-specific option (repeatable)")
    x.add_argument("--json", action="store_true", help="print one JSON object")
    x.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:          # --help, or a one-line usage error already printed
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except BitsmithError as e:
        print(f"bitsmith: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitsmith: interrupted", file=sys.stderr)
        return 130
    except (OSError, MemoryError) as e:
        print(f"bitsmith: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
