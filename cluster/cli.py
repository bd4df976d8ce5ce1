"""The `cluster` command. Each subcommand's errors end as one line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

from cluster import serve
from cluster.cli_args import add_engine_args, check_model, engine_config_from_args


def chat_main(args: argparse.Namespace) -> int:
    """`cluster chat`: the terminal chat (cluster.chat_loop) over a local engine, streamed."""
    from cluster.api import Pipeline
    from cluster.chat_loop import chat_loop
    from cluster.config import GenerationConfig
    from cluster.engine.errors import RequestFailedError
    from cluster.engine.multimodal import load_image

    check_model(args.model)
    pipe = Pipeline(args.model, engine_config_from_args(args))
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           top_k=args.top_k, repetition_penalty=args.repetition_penalty)

    def send(messages: list[dict]) -> Iterator[str]:
        chunks = pipe.stream_infer(messages, gen)
        try:
            for chunk in chunks:
                yield chunk.text
        finally:
            chunks.close()  # aborts the request when the answer is stopped

    def attach(path: str) -> str:
        load_image(path)  # ValueError saying what is wrong with the file
        return path

    try:
        return chat_loop(send, pipe.engine.model_name, attach, args.system, errors=(ValueError, RequestFailedError))
    finally:
        pipe.close()


def convert_main(args: argparse.Namespace) -> int:
    from cluster.convert.hf import convert_checkpoint
    from cluster.convert.source import resolve_source

    dtype = "bfloat16" if args.dtype == "auto" else args.dtype
    cfg = convert_checkpoint(resolve_source(args.model), Path(args.out), args.tp, dtype, quant=args.quant)
    quant = f", {cfg.quant['method']} weights" if cfg.quant else ""
    print(f"wrote {args.tp} shard(s) of {cfg.num_layers} layers ({dtype}{quant}) to {args.out}")
    return 0


def auto_awq_main(args: argparse.Namespace) -> int:
    """4-bit AWQ of an HF model (or the embedded default): a checkpoint every other command takes as MODEL."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.convert.source import resolve_source
    from cluster.quant import awq

    if args.w_bits != 4:
        raise ValueError(f"--w-bits {args.w_bits} is not supported; 4 is")
    src = resolve_source(args.model)
    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(str(src.path), dtype=torch.float32 if device == "cpu" else torch.float16,
                                                 **kw).to(device)
    tok = AutoTokenizer.from_pretrained(str(src.path), **kw)
    texts = (Path(args.calib_file).read_text().split("\n\n") if args.calib_file else awq.default_calibration_text())
    ids = awq.calibration_ids(tok, texts, args.calib_samples, args.calib_seqlen)
    t0 = time.time()
    quantized = awq.quantize_model(model, ids, args.w_group_size, search=not args.no_search, progress=True)
    out = awq.save_awq_checkpoint(model, quantized, tok, args.work_dir, args.w_group_size)
    print(f"wrote 4-bit AWQ checkpoint ({len(quantized)} linears, group {args.w_group_size}, {ids.shape[0]} x "
          f"{ids.shape[1]} calibration tokens, {time.time() - t0:.0f} s) to {out}")
    return 0


def fp8_main(args: argparse.Namespace) -> int:
    """FP8 weights of an HF model (or the embedded default): a compressed-tensors checkpoint every command takes."""
    import time

    from cluster.quant.fp8_export import write_fp8_checkpoint

    t0 = time.time()
    out, linears = write_fp8_checkpoint(args.model, args.work_dir)
    print(f"wrote FP8 checkpoint ({linears} linears in e4m3, a scale per output channel, activations per token; "
          f"{time.time() - t0:.0f} s) to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cluster")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="multi-turn chat with a model in the terminal")
    add_engine_args(p)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--repetition-penalty", type=float, default=1.05)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=chat_main)

    p = sub.add_parser("convert", help="convert an HF checkpoint to the engine format, one shard per rank")
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--quant", default=None, choices=["awq", "fp8"],
                   help="quantize a full-precision checkpoint's weights (see `cluster serve --help`)")
    p.set_defaults(func=convert_main)

    lite = sub.add_parser("lite", help="quantization").add_subparsers(dest="lite_command", required=True)
    p = lite.add_parser("auto_awq", help="4-bit AWQ weights: calibrate, scale, round; writes an AWQ checkpoint")
    p.add_argument("model", nargs="?", default=None, help="HF checkpoint dir or .gguf (default: embedded SmolLM2)")
    p.add_argument("--work-dir", required=True, help="where the quantized checkpoint goes")
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--w-group-size", type=int, default=128)
    p.add_argument("--calib-samples", type=int, default=64, help="calibration blocks (at most)")
    p.add_argument("--calib-seqlen", type=int, default=128, help="tokens per calibration block")
    p.add_argument("--calib-file", default=None, help="calibration text (paragraphs); default: built-in text")
    p.add_argument("--no-search", action="store_true", help="plain round-to-nearest, no activation-aware scales")
    p.add_argument("--device", default=None)
    p.set_defaults(func=auto_awq_main)
    p = lite.add_parser("fp8", help="FP8 (e4m3) weights, a scale per output channel; writes a compressed-tensors "
                        "checkpoint (serve it on compute capability >= 8.9, or on the CPU)")
    p.add_argument("model", nargs="?", default=None, help="HF checkpoint dir or .gguf (default: embedded SmolLM2)")
    p.add_argument("--work-dir", required=True, help="where the quantized checkpoint goes")
    p.set_defaults(func=fp8_main)

    serve.add_serve_args(sub)
    parser.description = f"LLM serving and chat; commands: {', '.join(sub.choices)} (cluster COMMAND --help)"
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, MemoryError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if hasattr(e, "errors") and callable(e.errors):  # pydantic: name the field
            err = e.errors()[0]
            msg = f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
        print(f"cluster {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
