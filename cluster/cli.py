"""The `cluster` command. Each subcommand's errors end as one line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="HF checkpoint dir, .gguf file or converted dir (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--session-len", type=int, default=None)
    p.add_argument("--max-batch-size", type=int, default=128)
    p.add_argument("--cache-max-entry-count", type=float, default=0.8, help="share of free memory for the KV cache")
    p.add_argument("--quant-policy", type=int, default=0, choices=[0, 4, 8])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-prefix-caching", action="store_true")


def engine_config_from_args(args: argparse.Namespace):
    from cluster.config import EngineConfig

    return EngineConfig(tp=args.tp, dtype=args.dtype, session_len=args.session_len, max_batch_size=args.max_batch_size,
                        cache_max_entry_count=args.cache_max_entry_count, quant_policy=args.quant_policy,
                        device=args.device, enable_prefix_caching=not args.no_prefix_caching)


def chat_main(args: argparse.Namespace) -> int:
    """Multi-turn chat: history kept, streamed answers; `exit` or Ctrl-D leaves, Ctrl-C stops only the answer."""
    from cluster.api import Pipeline, Session
    from cluster.config import GenerationConfig
    from cluster.engine.multimodal import image_command, load_image

    pipe = Pipeline(args.model, engine_config_from_args(args))
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           top_k=args.top_k, repetition_penalty=args.repetition_penalty)
    session = Session()
    if args.system:
        session.messages.append({"role": "system", "content": args.system})
    print("chat with the model; 'exit' or Ctrl-D to leave, Ctrl-C stops an answer, '/image PATH' attaches an image "
          "to your next message", flush=True)
    images: list[str] = []
    try:
        while True:
            try:
                prompt = input("\n>>> ")
            except EOFError:
                print()
                break
            except KeyboardInterrupt:
                print()
                continue
            if prompt.strip() in ("exit", "quit"):
                break
            path = image_command(prompt)
            if path is not None:
                try:
                    load_image(path)
                    images.append(path)
                    print(f"[image attached: {path}; it goes with your next message]", flush=True)
                except ValueError as e:
                    print(f"[error: {e}]", flush=True)
                continue
            if not prompt.strip():
                continue
            pieces = pipe.chat(prompt, session, gen, stream=True, images=images)
            images = []
            try:
                for text in pieces:
                    print(text, end="", flush=True)
            except KeyboardInterrupt:
                pieces.close()  # aborts the request; the partial answer stays in the history
                print(" [stopped]", end="")
            except ValueError as e:  # this turn's input (an image, a prompt too long): the chat goes on
                print(f"[error: {e}]", end="")
            print(flush=True)
    finally:
        pipe.close()
    return 0


def convert_main(args: argparse.Namespace) -> int:
    from cluster.convert.hf import convert_checkpoint, resolve_source

    dtype = "bfloat16" if args.dtype == "auto" else args.dtype
    cfg = convert_checkpoint(resolve_source(args.model), Path(args.out), args.tp, dtype)
    print(f"wrote {args.tp} shard(s) of {cfg.num_layers} layers ({dtype}) to {args.out}")
    return 0


def auto_awq_main(args: argparse.Namespace) -> int:
    """4-bit AWQ of an HF model (or the embedded default): a checkpoint every other command takes as MODEL."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.convert.hf import resolve_source
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cluster", description="LLM serving: chat, serve, convert, benchmark")
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

    try:
        from cluster.serve import add_serve_args
    except ImportError:
        add_serve_args = None
    if add_serve_args is not None:
        add_serve_args(sub)
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
