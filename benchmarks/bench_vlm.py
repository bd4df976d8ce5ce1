#!/usr/bin/env python3
"""A vision-language model of a real shape on random weights (issue 14): the image encoder's throughput apart from
the language model's, the TTFT of an image request split into its parts, and decode with images in context.

    python benchmarks/bench_vlm.py [--shape qwen2.5-vl-7b] [--dir /tmp/qwen2.5-vl-7b] [--out DIR]
    python benchmarks/bench_vlm.py --shape tiny --device cpu       # the same path on the CPU, in seconds

The checkpoint is written once, converted (the engine's format: config.json, rank0.safetensors, vision.safetensors,
a preprocessor config and a word tokenizer), with random weights drawn on the device in its dtype (bf16 on a GPU,
no fp32 copy); a folder that holds one is reused. The engine loads it as a user's: LLMEngine(path, EngineConfig).
Prompts are PreparedPrompts built here (no PIL needed): random pixel values in the processor's layout
([patches, 3 * temporal_patch * patch^2]), the image's grid as smart_resize gives it, and token ids laid out as the
chat template and prepare_prompt lay them (<|vision_start|>, one <|image_pad|> per merged patch, <|vision_end|>).

Measured, in this order; a table is printed last and bench_vlm.json written to --out:
  (a) the encoder alone (engine.vision.encode_many, device-synced, warmed up): images/s at 1 and 8 images a call;
  (b) TTFT of one request with one image: the host's add_request, the encoder (engine.stats.vision_seconds), and
      the rest (prefill and the first token);
  (c) steady decode steps at batch 1 with one image in context, against the floor: (weight bytes + KV bytes read)
      / --bandwidth (4.0e12 B/s by default, about what the engine's GEMV chain reads on an H200);
  (d) the same at batch 16, one image each (their images encoded together when added together: the calls counted).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import time
from pathlib import Path

import torch

# Qwen2.5-VL-7B-Instruct. Language model: the hub's config.json (flat text keys, rope_scaling {type: mrope}); the
# same numbers as Qwen2-VL-7B's (tests/test_qwen2_vl.py HUB_QWEN2_VL_7B): hidden 3584, 28 layers, 28 heads, 4 KV
# heads, intermediate 18944, vocab 152064, rope theta 1e6, mrope_section [16, 24, 24], token ids 151643-151656;
# max_position_embeddings 128000 is Qwen2.5-VL's (the session here is 4096). Vision tower: the hub's vision_config;
# transformers' Qwen2_5_VLVisionConfig defaults agree on depth 32, intermediate 3420, 16 heads, patch 14, merge 2,
# temporal patch 2, window 112, full attention at blocks [7, 15, 23, 31] and out_hidden 3584, but its default
# hidden_size (3584) is not the 7B tower's width: 1280 is (the hub's config; qkv 1280 -> 3840, merger 5120 -> 3584 in
# a printed Qwen2.5-VL-7B module). Image processor: the hub's preprocessor_config.json (min_pixels 56 * 56,
# max_pixels 28 * 28 * 16384, CLIP's mean and std).
SHAPES = {
    "qwen2.5-vl-7b": dict(
        text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  max_position_embeddings=128000, hidden_act="silu", tie_word_embeddings=False,
                  use_sliding_window=False, bos_token_id=151643, eos_token_id=151645,
                  rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
        ids=dict(vision_start_token_id=151652, vision_end_token_id=151653, vision_token_id=151654,
                 image_token_id=151655, video_token_id=151656),
        chat=dict(im_start=151644, im_end=151645),
        vision=dict(depth=32, hidden_size=1280, hidden_act="silu", intermediate_size=3420, num_heads=16,
                    out_hidden_size=3584, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                    window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
        processor=dict(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2),
        sizes=(1024, 448), many=16, new_tokens=128),
    # the same layout at toy width, for the CPU: the real patch size, so image sizes give the real token counts
    "tiny": dict(
        text=dict(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=8192,
                  hidden_act="silu", tie_word_embeddings=False, use_sliding_window=False, bos_token_id=2000,
                  eos_token_id=2002, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}),
        ids=dict(vision_start_token_id=2003, vision_end_token_id=2004, vision_token_id=2005, image_token_id=2006,
                 video_token_id=2007),
        chat=dict(im_start=2001, im_end=2002),
        vision=dict(depth=2, hidden_size=64, hidden_act="silu", intermediate_size=128, num_heads=2,
                    out_hidden_size=128, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[1]),
        processor=dict(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2),
        sizes=(224, 112), many=4, new_tokens=8),
}
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def hf_config(shape: str) -> dict:
    """The checkpoint's config.json as the hub writes Qwen2.5-VL's: text keys flat, the tower's in vision_config."""
    s = SHAPES[shape]
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", **s["text"],
            **s["ids"], "vision_config": dict(s["vision"])}


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' Qwen2-VL image processor's smart_resize (models/qwen2_vl/image_processing_qwen2_vl.py): both
    sides multiples of factor (patch x merge), the area within [min_pixels, max_pixels], the aspect kept."""
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# -- the checkpoint ------------------------------------------------------------------------------------------------
def _random(shapes: dict[str, torch.Size], device: str, dtype: torch.dtype, seed: int):
    """A reader of random tensors by name: 1-d weights (norms) ones, biases and matrices N(0, 0.02), drawn on the
    device in `dtype`."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def get(name: str) -> torch.Tensor:
        shape = shapes[name]
        if len(shape) == 1 and name.endswith("weight"):
            return torch.ones(shape, device=device, dtype=dtype)
        return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=gen)

    get.names = set(shapes)
    return get


def write_checkpoint(shape: str, out: Path, device: str, seed: int = 0) -> Path:
    """out/{config.json, rank0.safetensors, vision.safetensors, preprocessor_config.json, tokenizer}: the converter's
    own mapping (qwen2_vl.text_config / vision_fields, hf.build_shards) over random tensors named as the checkpoint
    names them (transformers' modules built on the meta device give the names and shapes). Kept when there."""
    import transformers as tf
    from safetensors.torch import save_file

    from cluster.convert import qwen2_vl
    from cluster.convert.hf import build_shards, engine_config, in_model_dtype
    from cluster.convert.llava import VISION_FILE
    from cluster.convert.source import is_converted
    from cluster.models.qwen2_vl import _tower
    from random_checkpoint import save_word_tokenizer

    out = Path(out)
    if is_converted(out) and (out / VISION_FILE).exists():
        print(f"reusing {out}", flush=True)
        return out
    t0 = time.perf_counter()
    dtype = "bfloat16" if device == "cuda" else "float32"
    torch_dtype = getattr(torch, dtype)
    hf = hf_config(shape)
    text, vision = qwen2_vl.text_config(hf), qwen2_vl.vision_fields(hf)
    cfg = engine_config(text, dtype, 1, f"random-{shape}")
    lm_cfg = tf.AutoConfig.for_model("qwen2", **{k: v for k, v in text.items() if k != "model_type"})
    with torch.device("meta"):
        lm_shapes = {k: v.shape for k, v in tf.AutoModelForCausalLM.from_config(lm_cfg).state_dict().items()}
        tower_shapes = {k: v.shape for k, v in _tower(vision["kind"], vision["vision_config"]).state_dict().items()}
    shard = build_shards(_random(lm_shapes, device, torch_dtype, seed), text, cfg, 1)[0]
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in in_model_dtype(shard, torch_dtype).items()},
              str(out / "rank0.safetensors"))
    del shard
    tower = _random(tower_shapes, device, torch_dtype, seed + 1)
    save_file({"tower." + k: tower(k).contiguous() for k in sorted(tower_shapes)}, str(out / VISION_FILE))
    proc = {"image_processor_type": "Qwen2VLImageProcessor", **SHAPES[shape]["processor"], "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD, "do_resize": True, "do_rescale": True, "do_normalize": True,
            "do_convert_rgb": True, "resample": 3, "rescale_factor": 1 / 255}
    (out / "preprocessor_config.json").write_text(json.dumps(proc, indent=1))
    save_word_tokenizer(out, cfg.vocab_size)
    cfg.vision = vision
    cfg.save(out / "config.json")  # last: the folder counts as converted once this is there
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def weight_bytes(folder: Path) -> int:
    """Bytes a decode step reads of the language model's weights: every tensor but the embedding table."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(folder / "rank0.safetensors"), "pt") as f:
        for k in f.keys():
            if k == "embed_tokens.weight" or k.endswith("inv_freq"):
                continue
            sl = f.get_slice(k)
            total += math.prod(sl.get_shape()) * _BYTES.get(sl.get_dtype(), 2)
    return total


_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "F8_E4M3": 1, "U8": 1, "I8": 1}


# -- prompts -------------------------------------------------------------------------------------------------------
class Prompts:
    """PreparedPrompts of one image each: random pixels of the processor's layout, token ids as the chat template
    renders [image, question] and prepare_prompt expands the image's pad token."""

    def __init__(self, shape: str, seed: int = 0):
        s = SHAPES[shape]
        self.p, self.ids, self.chat, self.vocab = s["processor"], s["ids"], s["chat"], s["text"]["vocab_size"]
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def grid(self, size: int) -> tuple[int, int, int]:
        p, m = self.p["patch_size"], self.p["merge_size"]
        h, w = smart_resize(size, size, p * m, self.p["min_pixels"], self.p["max_pixels"])
        return 1, h // p, w // p  # one image: temporal 1 (the processor repeats the frame to temporal_patch_size)

    def tokens(self, size: int) -> int:
        t, h, w = self.grid(size)
        return t * h * w // self.p["merge_size"] ** 2

    def text(self, n: int) -> list[int]:
        return [self.rng.randrange(0, min(self.ids["vision_start_token_id"], self.chat["im_start"]) - 1)
                for _ in range(n)]

    def make(self, size: int):
        """<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n<|vision_start|>
        <|image_pad|> x tokens <|vision_end|>Describe this image.<|im_end|>\\n<|im_start|>assistant\\n, the text as
        random words of about its token count."""
        from cluster.engine.tokenizer import PreparedPrompt

        t, h, w = self.grid(size)
        p = self.p
        pixels = torch.randn(t * h * w, 3 * p["temporal_patch_size"] * p["patch_size"] ** 2, generator=self.gen)
        s, e = self.chat["im_start"], self.chat["im_end"]
        ids = ([s] + self.text(8) + [e] + self.text(1) + [s] + self.text(2) + [self.ids["vision_start_token_id"]]
               + [self.ids["image_token_id"]] * self.tokens(size) + [self.ids["vision_end_token_id"]]
               + self.text(5) + [e] + self.text(1) + [s] + self.text(2))
        return PreparedPrompt(ids, pixels, chat=True, image_grid=torch.tensor([[t, h, w]]))


# -- timing --------------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def encoder_rate(eng, prompts: Prompts, size: int, batch: int, reps: int, device: str) -> dict:
    """engine.vision.encode_many over `batch` distinct images of `size` (one call), warmed up: s a call (the median
    of `reps`), images/s."""
    items = [(p.pixel_values, p.image_grid) for p in (prompts.make(size) for _ in range(batch))]
    for _ in range(2 if device == "cuda" else 1):
        eng.vision.encode_many(items)
    times = [timed(lambda: eng.vision.encode_many(items), device)[0] for _ in range(reps)]
    t = statistics.median(times)
    return {"size": size, "tokens_per_image": prompts.tokens(size), "patches_per_image": items[0][0].shape[0],
            "batch": batch, "s_per_call": t, "images_per_s": batch / t, "calls": reps}


def ttft(eng, prompt, device: str) -> dict:
    """One request alone: add_request (host: digests, M-RoPE ids), then steps until its first token; the encoder's
    part from the engine's counter."""
    from cluster.config import GenerationConfig

    gen = GenerationConfig(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    v0 = eng.stats.vision_seconds
    sync(device)
    t0 = time.perf_counter()
    rid = eng.add_request(prompt, gen)
    t_add = time.perf_counter() - t0
    while True:
        outs = [o for o in eng.step() if o.request_id == rid]
        if any(o.error is not None for o in outs):
            raise next(o.error for o in outs if o.error is not None)
        if any(o.token_ids for o in outs):
            break
        if not outs and not eng.has_unfinished():
            raise RuntimeError(f"request {rid} ended without a token")
    total = time.perf_counter() - t0
    enc = eng.stats.vision_seconds - v0
    while eng.has_unfinished():
        eng.step()
    return {"prompt_tokens": len(prompt), "ttft_s": total, "add_request_s": t_add, "encoder_s": enc,
            "prefill_and_first_token_s": total - t_add - enc}


def steady_decode(eng, prompts: list, steps: int, device: str) -> dict:
    """Every prompt added together (their images encoded together at the next step), prefilled, 5 steps in; then
    the mean of `steps` engine steps."""
    from bench_engine import decoding

    s0 = (eng.stats.vision_seconds, eng.stats.vision_calls, eng.stats.images_encoded)
    t0 = time.perf_counter()
    with decoding(eng, prompts, steps):
        admitted = time.perf_counter() - t0
        if len(eng.scheduler.running) != len(prompts):  # one failed (its error is in the log) or was preempted
            raise RuntimeError(f"{len(eng.scheduler.running)} of {len(prompts)} requests decoding")
        enc = [b - a for a, b in zip(s0, (eng.stats.vision_seconds, eng.stats.vision_calls, eng.stats.images_encoded))]
        t, _ = timed(lambda: [eng.step() for _ in range(steps)], device)
    ms = t * 1e3 / steps
    return {"batch": len(prompts), "prompt_tokens": len(prompts[0]), "steps": steps, "step_ms": ms,
            "tok_s": len(prompts) / ms * 1e3, "admit_prefill_5_steps_s": admitted, "encoder_s": enc[0],
            "encoder_calls": int(enc[1]), "images_encoded": int(enc[2])}


def _engine(folder: Path, device: str, cache_max_entry_count: float = 0.7):
    """LLMEngine(folder, EngineConfig(...)) as a user starts one. Where transformers cannot load the image processor
    (no PIL / torchvision on the machine), it is left out: these prompts come preprocessed."""
    import transformers as tf

    from cluster.config import EngineConfig
    from cluster.engine.engine import LLMEngine

    note = "loaded"
    try:
        tf.AutoImageProcessor.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - ImportError for a missing backend, or its ValueError
        note = f"not loadable here ({type(e).__name__}: {str(e)[:120]}); left out, prompts come preprocessed"
        tf.AutoImageProcessor.from_pretrained = staticmethod(lambda *a, **k: None)
    ec = EngineConfig(device=device, dtype="bfloat16" if device == "cuda" else "float32", session_len=4096,
                      max_batch_size=32, max_prefill_token_num=8192, cache_max_entry_count=cache_max_entry_count)
    t0 = time.perf_counter()
    eng = LLMEngine(str(folder), ec)
    return eng, time.perf_counter() - t0, note


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-vl-7b", choices=sorted(SHAPES))
    ap.add_argument("--dir", default=None, help="the converted checkpoint (written if absent); default /tmp/<shape>")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--bandwidth", type=float, default=4.0e12, help="bytes/s the decode floor assumes")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="square image sides (default: the shape's)")
    ap.add_argument("--many", type=int, default=None, help="batch of the last case (default: the shape's)")
    ap.add_argument("--new-tokens", type=int, default=None, help="decode steps timed (default: the shape's)")
    ap.add_argument("--cache-max-entry-count", type=float, default=0.7)
    ap.add_argument("--wait-for", default=None, help="start up, then measure only once this file exists")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)  # a request the engine fails says why in the log
    shape, device = SHAPES[args.shape], args.device
    sizes, many = args.sizes or list(shape["sizes"]), args.many or shape["many"]
    steps = args.new_tokens or shape["new_tokens"]
    folder = Path(args.dir or f"/tmp/bench-vlm-{args.shape}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"shape": args.shape, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                 "torch": torch.__version__}
    import transformers

    res["transformers"] = transformers.__version__
    t, _ = timed(lambda: write_checkpoint(args.shape, folder, device), device)
    res["checkpoint_s"] = t
    eng, res["engine_start_s"], res["image_processor"] = _engine(folder, device, args.cache_max_entry_count)
    res["phases"] = eng.phases.summary()
    print(f"engine ready in {res['engine_start_s']:.0f} s ({res['phases']})", flush=True)
    res["encoder_attention"] = getattr(eng.vision.tower.config, "_attn_implementation", None)
    res["weight_bytes"] = wb = weight_bytes(folder)
    runner = eng.runner
    kv_per_token = runner.block_bytes / runner.block_size
    prompts = Prompts(args.shape, seed=1)
    from bench_engine import wait_for_file

    res["waited_s"] = wait_for_file(args.wait_for)

    res["encoder"] = []  # (a)
    for size in sizes:
        for batch in (1, 8):
            reps = (5 if batch == 1 else 3) if device == "cuda" else 1
            r = encoder_rate(eng, prompts, size, batch, reps, device)
            res["encoder"].append(r)
            print(f"encoder {size}x{size} ({r['tokens_per_image']} tokens, {r['patches_per_image']} patches) x "
                  f"{batch}: {r['s_per_call'] * 1e3:.1f} ms a call, {r['images_per_s']:.1f} images/s", flush=True)
    big = sizes[0]
    ttft(eng, prompts.make(big), device)  # warm-up: the first image request's shapes
    runs = [ttft(eng, prompts.make(big), device) for _ in range(3 if device == "cuda" else 1)]  # (b)
    res["ttft"] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    r = res["ttft"]
    print(f"TTFT {big}x{big}, {r['prompt_tokens']} prompt tokens: {r['ttft_s'] * 1e3:.1f} ms = add_request "
          f"{r['add_request_s'] * 1e3:.1f} + encoder {r['encoder_s'] * 1e3:.1f} + prefill and first token "
          f"{r['prefill_and_first_token_s'] * 1e3:.1f}", flush=True)

    res["decode"] = []  # (c), (d)
    for batch in (1, many):
        d = steady_decode(eng, [prompts.make(big) for _ in range(batch)], steps, device)
        ctx = d["prompt_tokens"] + 5 + steps / 2  # the timed steps' mean context
        d["floor_ms"] = (wb + batch * ctx * kv_per_token) / args.bandwidth * 1e3
        d["weights_floor_ms"] = wb / args.bandwidth * 1e3
        d["of_floor"] = d["floor_ms"] / d["step_ms"]
        res["decode"].append(d)
        print(f"decode batch {batch}, one {big}x{big} image each: {d['step_ms']:.2f} ms a step = {d['tok_s']:.1f} "
              f"tok/s; floor {d['floor_ms']:.2f} ms ({d['of_floor']:.2f} of it); their images: {d['images_encoded']} "
              f"in {d['encoder_calls']} encoder call(s), {d['encoder_s'] * 1e3:.0f} ms", flush=True)
    res["stats"] = eng.stats_dict()
    (out / "bench_vlm.json").write_text(json.dumps(res, indent=1, default=str))

    print(f"\n{args.shape} on {res['device']}: weights read a step {wb / 1e9:.3f} GB, floor at "
          f"{args.bandwidth / 1e12:.1f} TB/s; encoder attention: {res['encoder_attention']}; checkpoint "
          f"{res['checkpoint_s']:.0f} s, engine start {res['engine_start_s']:.0f} s")
    print("| case | tokens | result |")
    print("|---|---:|---|")
    for r in res["encoder"]:
        print(f"| (a) encoder, {r['size']}x{r['size']} x {r['batch']} a call | {r['tokens_per_image']} an image | "
              f"**{r['images_per_s']:.1f} images/s** ({r['s_per_call'] * 1e3:.1f} ms a call) |")
    r = res["ttft"]
    print(f"| (b) TTFT, one {big}x{big} image | {r['prompt_tokens']} | **{r['ttft_s'] * 1e3:.1f} ms** = add_request "
          f"{r['add_request_s'] * 1e3:.1f} + encoder {r['encoder_s'] * 1e3:.1f} + prefill and first token "
          f"{r['prefill_and_first_token_s'] * 1e3:.1f} |")
    for d, tag in zip(res["decode"], ("(c)", "(d)")):
        print(f"| {tag} decode, batch {d['batch']}, one image each | {d['prompt_tokens']} each | "
              f"**{d['tok_s']:.1f} tok/s** ({d['step_ms']:.2f} ms a step; floor {d['floor_ms']:.2f} ms, "
              f"{d['of_floor']:.2f} of it; weights alone {d['weights_floor_ms']:.2f} ms); its {d['images_encoded']} "
              f"images in {d['encoder_calls']} encoder call(s), {d['encoder_s'] * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
