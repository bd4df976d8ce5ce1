"""Hugging Face checkpoint (safetensors, .bin or GGUF) -> engine format: one safetensors shard per TP rank.

Which checkpoint tensors mean what is each family's entry (convert/families.py, read by convert/family.py); this
module reads files, slices for ranks and writes. Engine names per rank (qkv and gate/up fused, already sliced):
  embed_tokens.weight, [lm_head.weight], norm.{weight,[bias]}, rotary.inv_freq, [rotary_local.inv_freq],
  layers.{i}.input_layernorm.{weight,[bias]}, layers.{i}.self_attn.qkv_proj.{weight,[bias]},
  layers.{i}.self_attn.o_proj.{weight,[bias]}, [layers.{i}.self_attn.{q_norm,k_norm}.weight],
  [layers.{i}.post_attention_layernorm.{weight,[bias]}], [layers.{i}.post_{self_attn,mlp}_layernorm.weight],
  layers.{i}.mlp.gate_up_proj.weight (a plain MLP: up_proj.weight), layers.{i}.mlp.down_proj.weight,
  [layers.{i}.self_attn.attn.alibi_slopes] (fp32, the rank's heads)
Expert layers (Mixtral, Qwen2/3-MoE, DeepSeek-MoE, Dbrx) have instead, every expert on every rank, sliced along
its FFN width:
  layers.{i}.mlp.gate.weight, layers.{i}.mlp.w13, layers.{i}.mlp.w2,
  [layers.{i}.mlp.shared_expert.{gate_up_proj,down_proj}.weight, [layers.{i}.mlp.shared_expert_gate.weight]],
  [layers.{i}.mlp.e_score_correction_bias (DeepSeek-V3, fp32)]
Multi-head latent attention layers (DeepSeek-V2/V3, cluster/layers/mla.py) have, instead of qkv_proj:
  layers.{i}.self_attn.{q_proj | q_a_proj, q_a_layernorm, q_b_proj}.weight,
  layers.{i}.self_attn.{kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}.weight
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import torch

from cluster.convert import fp8 as fp8_ckpt
from cluster.convert import head_layout, rope
from cluster.convert.awq import AWQReader, merge_shards
from cluster.convert.families import family_for
from cluster.convert.family import LINEAR_KEYS, config_view, read_layer, read_model
from cluster.convert.quant import log_at_conversion, quantize_layer_rtn, resolve_quant
from cluster.convert.source import Source
from cluster.quant import fp8
from cluster.models.config import ModelConfig

log = logging.getLogger(__name__)


def read_hf_config(src: Source) -> dict:
    if src.gguf_file:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(src.path, gguf_file=src.gguf_file).to_dict()
    return json.loads((src.path / "config.json").read_text())


def _tensor_reader(src: Source) -> Callable[[str], torch.Tensor]:
    """name -> tensor, reading lazily so a large checkpoint is never whole in memory."""
    if src.gguf_file:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32)
        sd = model.state_dict()
        return sd.__getitem__
    from safetensors import safe_open

    index: dict[str, Callable[[], torch.Tensor]] = {}
    st_files = sorted(src.path.glob("*.safetensors"))
    if st_files:
        for f in st_files:
            handle = safe_open(str(f), framework="pt")
            for k in handle.keys():
                index[k] = (lambda h=handle, k=k: h.get_tensor(k))
    else:
        for f in sorted(src.path.glob("*.bin")):
            sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            for k, v in sd.items():
                index[k] = (lambda v=v: v)
    if not index:
        raise FileNotFoundError(f"no *.safetensors or *.bin weights in {src.path}")

    def get(name: str) -> torch.Tensor:
        if name not in index:
            raise KeyError(f"checkpoint {src.path} has no tensor {name!r}")
        return index[name]()

    get.names = set(index)  # type: ignore[attr-defined]
    return get


def engine_config(hf: dict, dtype: str, tp: int, source: str, quant: str | None = None) -> ModelConfig:
    """The engine's ModelConfig; quant: EngineConfig.quant, applied at conversion unless the checkpoint says its own
    (convert/quant.py)."""
    fam = family_for(hf.get("model_type", ""))
    view = config_view(fam, hf)
    extra = {**fam.fields, **(fam.config_hook(view) if fam.config_hook else {})}  # refusals before anything else
    heads = view["num_attention_heads"]
    eos = view.get("eos_token_id")
    fields = dict(
        architecture="llama",
        vocab_size=view["vocab_size"],
        hidden_size=view["hidden_size"],
        intermediate_size=view["intermediate_size"],
        num_layers=view["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=view.get("num_key_value_heads") or heads,
        head_dim=view.get("head_dim") or view["hidden_size"] // heads,
        rms_norm_eps=view.get("rms_norm_eps", 1e-6),
        max_position_embeddings=view.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(view.get("tie_word_embeddings", False)),
        attention_bias=bool(view.get("attention_bias", False)),
        eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
        bos_token_id=view.get("bos_token_id"),
        dtype=dtype,
        tp=tp,
        source=source,
        hf_model_type=view.get("model_type", ""),
        quant=resolve_quant(view, quant),
    )
    fields.update(extra)
    fields.update(_head_fields(view, fields, fam.name))
    limit = rope.context_limit(view, fam.name, windowed="sliding_layers" in fields)
    if limit:
        fields["max_position_embeddings"] = limit
    cfg = ModelConfig(**fields)
    if cfg.quant and cfg.kv_lora_rank:
        raise ValueError(f"{cfg.quant['method']}-quantized multi-head latent attention models (DeepSeek-V2/V3) are "
                         "not supported yet; serve a bf16 checkpoint without --quant")
    if cfg.quant and cfg.num_experts:
        raise ValueError(f"{cfg.quant['method']}-quantized mixture-of-experts models are not supported yet; "
                         "serve this one without --quant")
    if cfg.quant.get("method") == "fp8" and view.get("quantization_config") and not _proj_named(fam):
        raise ValueError(f"FP8 {fam.name} checkpoints are not supported; convert the bf16 one with --quant fp8")
    cfg.check_tp(tp)
    return cfg


def _head_fields(view: dict, fields: dict, name: str) -> dict:
    """head_dim padded to a power of two and the rotary's extent, for convert/head_layout.py."""
    if fields.get("kv_lora_rank"):  # MLA: head_dim is the rope dims, all rotating, never padded (layers/mla.py)
        return {"rotary_dim": 0}
    src = fields["head_dim"]
    dim = head_layout.padded_dim(src)
    out = {"head_dim": dim, "real_head_dim": src if dim != src else 0,
           "rotary_dim": fields.get("rotary_dim") or rope.rotary_dim(view, src)}
    if out["rotary_dim"] == src:
        out["rotary_dim"] = 0
    if dim != src and fields.get("qk_norm"):
        raise ValueError(f"{name}: head_dim {src} with per-head q/k norms is not supported (the kernels need a "
                         "power-of-two head_dim, and padding would change the norms' mean)")
    return out


def _proj_named(fam) -> bool:
    """FP8 checkpoints are read by their `*_proj` linears (convert/fp8.py); a family named otherwise is not."""
    paths = [m for k, v in fam.layer.items() if k in LINEAR_KEYS for m in ((v,) if isinstance(v, str) else v)]
    return all(m.endswith("_proj") for m in paths)


def _hf_layer_tensors(get, hf: dict, cfg: ModelConfig, i: int) -> dict[str, torch.Tensor]:
    """One layer's full (unsharded) tensors, in engine meaning: q, k, v separate so each rank can slice them."""
    t = read_layer(family_for(cfg.hf_model_type), get, cfg, i)
    head_layout.apply(t, cfg)
    return t


def _rows(x: torch.Tensor, rank: int, parts: int) -> torch.Tensor:
    n = x.shape[0] // parts
    return x[rank * n:(rank + 1) * n]


def _kv_rows(x: torch.Tensor, cfg: ModelConfig, rank: int, tp: int) -> torch.Tensor:
    """KV heads split over ranks, or replicated when fewer than ranks (rank r keeps head r // (tp / kv_heads))."""
    if cfg.num_kv_heads >= tp:
        return _rows(x, rank, tp)
    head = rank // (tp // cfg.num_kv_heads)
    return x[head * cfg.head_dim:(head + 1) * cfg.head_dim]


def _mlp_shard(t: dict[str, torch.Tensor], prefix: str, rank: int, tp: int) -> dict[str, torch.Tensor]:
    """A gated MLP's [gate; up] rows (a plain one's up rows) and down columns for one rank."""
    down = {prefix + "down_proj.weight": _rows(t["down"].t(), rank, tp).t()}
    if "gate" not in t:  # a plain MLP (Falcon)
        return {prefix + "up_proj.weight": _rows(t["up"], rank, tp), **down}
    return {prefix + "gate_up_proj.weight": torch.cat([_rows(t["gate"], rank, tp), _rows(t["up"], rank, tp)]), **down}


def _expert_shard(t: dict[str, torch.Tensor], prefix: str, rank: int, tp: int) -> dict[str, torch.Tensor]:
    n = t["e_gate"].shape[1] // tp
    cols = slice(rank * n, (rank + 1) * n)
    out = {prefix + "gate.weight": t["router"],
           prefix + "w13": torch.cat([t["e_gate"][:, cols], t["e_up"][:, cols]], dim=1),
           prefix + "w2": t["e_down"][:, :, cols].contiguous()}
    if "gate" in t:  # the shared expert (Qwen2-MoE, DeepSeek-MoE), sliced like a dense MLP
        out.update(_mlp_shard(t, prefix + "shared_expert.", rank, tp))
    if "shared_gate" in t:  # its sigmoid gate (Qwen2-MoE)
        out[prefix + "shared_expert_gate.weight"] = t["shared_gate"]
    if "router_bias" in t:  # DeepSeek-V3's choice-only bias
        out[prefix + "e_score_correction_bias"] = t["router_bias"]
    return out


def _mla_shard(t: dict[str, torch.Tensor], prefix: str, rank: int, tp: int) -> dict[str, torch.Tensor]:
    """Multi-head latent attention (cluster/layers/mla.py): the rank's heads' rows of q_proj / q_b_proj and
    kv_b_proj and its columns of o_proj; the latent's projection and both norms whole on every rank."""
    out = {prefix + "kv_a_proj_with_mqa.weight": t["wkv_a"], prefix + "kv_a_layernorm.weight": t["kv_a_norm"],
           prefix + "kv_b_proj.weight": _rows(t["wkv_b"], rank, tp),
           prefix + "o_proj.weight": _rows(t["o"].t(), rank, tp).t()}
    if "wq" in t:
        out[prefix + "q_proj.weight"] = _rows(t["wq"], rank, tp)
    else:
        out.update({prefix + "q_a_proj.weight": t["wq_a"], prefix + "q_a_layernorm.weight": t["q_a_norm"],
                    prefix + "q_b_proj.weight": _rows(t["wq_b"], rank, tp)})
    return out


def shard_layer(t: dict[str, torch.Tensor], cfg: ModelConfig, rank: int, tp: int, i: int) -> dict[str, torch.Tensor]:
    p = f"layers.{i}."
    if cfg.kv_lora_rank:
        out = _mla_shard(t, p + "self_attn.", rank, tp)
    else:
        out = {p + "self_attn.qkv_proj.weight": torch.cat(
                   [_rows(t["q"], rank, tp), _kv_rows(t["k"], cfg, rank, tp), _kv_rows(t["v"], cfg, rank, tp)]),
               p + "self_attn.o_proj.weight": _rows(t["o"].t(), rank, tp).t()}
    out.update((_expert_shard if cfg.is_sparse(i) else _mlp_shard)(t, p + "mlp.", rank, tp))
    if "q_b" in t:
        out[p + "self_attn.qkv_proj.bias"] = torch.cat(
            [_rows(t["q_b"], rank, tp), _kv_rows(t["k_b"], cfg, rank, tp), _kv_rows(t["v_b"], cfg, rank, tp)])
    if cfg.alibi:  # this rank's heads' slopes
        out[p + "self_attn.attn.alibi_slopes"] = _rows(rope.alibi_slopes(cfg.num_heads), rank, tp)
    if "o_b" in t:  # added once, after the all-reduce
        out[p + "self_attn.o_proj.bias"] = t["o_b"]
    for key in ("q_norm", "k_norm"):  # per head: the same on every rank
        if key in t:
            out[p + f"self_attn.{key}.weight"] = t[key]
    for key, name in (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm"),
                      ("post_ln1", "post_self_attn_layernorm"), ("post_ln2", "post_mlp_layernorm")):
        if key in t:  # post_ln*: sandwich norms (GLM-4-0414), on each block's output before the residual add
            out[p + f"{name}.weight"] = t[key]
        if key + "_b" in t:  # LayerNorm biases (Falcon)
            out[p + f"{name}.bias"] = t[key + "_b"]
    return out


def _vocab_rows(x: torch.Tensor, cfg: ModelConfig, rank: int, tp: int) -> torch.Tensor:
    per = -(-cfg.vocab_size // tp)
    if per * tp == x.shape[0]:
        return _rows(x, rank, tp)
    padded = torch.zeros(per * tp, x.shape[1], dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    return padded[rank * per:(rank + 1) * per]


def build_shards(get: Callable[[str], torch.Tensor], hf: dict, cfg: ModelConfig, tp: int,
                 progress: bool = False) -> list[dict[str, torch.Tensor]]:
    """Every rank's engine tensors from a checkpoint reader (each layer read once for all ranks)."""
    from tqdm import tqdm

    fam = family_for(cfg.hf_model_type)
    hf = config_view(fam, hf)
    top = read_model(fam, get, cfg)
    embed, head = top["embed"], top.get("head")
    inv_freq, cfg.rope_attention_scaling = rope.inv_freq(hf, cfg)
    if cfg.local_rope:  # Gemma 3: the sliding layers' table
        local_freq, cfg.local_rope_attention_scaling = rope.local_inv_freq(hf, cfg)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for r in range(tp):
        shards[r]["embed_tokens.weight"] = _vocab_rows(embed, cfg, r, tp)
        if head is not None:
            shards[r]["lm_head.weight"] = _vocab_rows(head, cfg, r, tp)
        shards[r]["norm.weight"] = top["norm"]
        if "norm_b" in top:
            shards[r]["norm.bias"] = top["norm_b"]
        shards[r]["rotary.inv_freq"] = inv_freq.to(embed.device)
        if cfg.local_rope:
            shards[r]["rotary_local.inv_freq"] = local_freq.to(embed.device)
    method, stored = cfg.quant.get("method"), bool(hf.get("quantization_config"))  # stored: in the checkpoint
    awq = AWQReader(get) if method == "awq" and stored else None
    f8 = fp8_ckpt.FP8Reader(get, hf, tp) if method == "fp8" and stored else None
    quant = f" {method}" if method else ""
    for i in tqdm(range(cfg.num_layers), desc=f"converting {Path(cfg.source).name} (tp={tp}, {cfg.dtype}{quant})",
                  disable=not progress, unit="layer"):
        if method == "awq":  # the 4-bit q values, zeros and scales slice over ranks like the weight they make
            if awq is not None:
                parts = [_hf_layer_tensors(view, hf, cfg, i) for view in (awq.q, awq.zeros, awq.scales)]
                awq.clear()
            else:
                parts = quantize_layer_rtn(_hf_layer_tensors(get, hf, cfg, i), cfg.quant["group_size"])
            for r in range(tp):
                shards[r].update(merge_shards(*(shard_layer(t, cfg, r, tp, i) for t in parts)))
            continue
        if method == "fp8":  # e4m3 values and their per-channel scales, sliced alike (convert/fp8.py)
            if f8 is not None:
                parts = [_hf_layer_tensors(view, hf, cfg, i) for view in (f8.q, f8.scale)]
                f8.clear()
            else:
                parts = fp8_ckpt.quantize_layer(_hf_layer_tensors(get, hf, cfg, i), tp)
            for r in range(tp):
                shards[r].update(fp8_ckpt.merge_shards(*(shard_layer(t, cfg, r, tp, i) for t in parts)))
            continue
        t = _hf_layer_tensors(get, hf, cfg, i)
        for r in range(tp):
            shards[r].update(shard_layer(t, cfg, r, tp, i))
    if f8 is not None and f8.requantized:
        log.info("%d decoder linears the checkpoint left in full precision were quantized to fp8 per channel",
                 f8.requantized)
    return shards


def in_model_dtype(shard: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A rank's tensors as the engine loads them: in the model dtype, but for what stays as built (fp32 position
    tables, slopes, scales and the correction bias; integer and FP8 weights). Gemma's (1 + w) norms are built in
    fp32 and cast here: a norm weight wider than the activations would widen the norm's output."""
    keep = {k for k, v in shard.items() if k.endswith(("inv_freq", "alibi_slopes", ".weight_scale",
                                                        ".e_score_correction_bias"))
            or not v.is_floating_point() or v.dtype == fp8.FP8}
    return {k: (v if k in keep else v.to(dtype)) for k, v in shard.items()}


def convert_checkpoint(src: Source, out_dir: Path, tp: int, dtype: str, progress: bool = True,
                       quant: str | None = None) -> ModelConfig:
    """Write config.json, rank{r}.safetensors for every rank, and the tokenizer into `out_dir`. quant: 'awq' or
    'fp8' to quantize a full-precision checkpoint here (see convert/quant.py)."""
    from safetensors.torch import save_file

    from cluster.convert.vlm import vlm_for

    hf = read_hf_config(src)
    vlm = vlm_for(hf)  # LLaVA, Qwen2-VL: the language model converts as its family, the vision side is kept whole
    if vlm:
        hf, vision = vlm.text_config(hf), vlm.vision_fields(hf)
    cfg = engine_config(hf, dtype, tp, str(src.path / (src.gguf_file or "")), quant)  # refusals before any weight
    get = _tensor_reader(src)
    if vlm:
        get, vision_get = vlm.text_reader(get), get
    if cfg.quant and not hf.get("quantization_config"):
        log_at_conversion(cfg.quant["method"])
    _add_generation_eos(src, cfg)
    tokenizer = _load_tokenizer(src, family_for(cfg.hf_model_type).tokenizer_hint)
    if vlm and hasattr(vlm, "chat_template"):  # DeepSeek-VL: the template its processor applies, not the tokenizer's
        tokenizer.chat_template = vlm.chat_template(src.path) or tokenizer.chat_template
    torch_dtype = getattr(torch, dtype)
    shards = build_shards(get, hf, cfg, tp, progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    if vlm:
        cfg.vision = vision
        vlm.save_vision(vision_get, src.path, out_dir, torch_dtype)
    for r, shard in enumerate(shards):
        save_file({k: v.contiguous() for k, v in in_model_dtype(shard, torch_dtype).items()},
                  str(out_dir / f"rank{r}.safetensors"))
    tokenizer.save_pretrained(out_dir)
    cfg.save(out_dir / "config.json")
    return cfg


def _add_generation_eos(src: Source, cfg: ModelConfig) -> None:
    """Llama 3 and ChatGLM3 list several EOS ids in generation_config.json, QWen's remote code single-token
    stop_words_ids; the engine stops on all of them."""
    gen = src.path / "generation_config.json"
    if not src.gguf_file and gen.exists():
        g = json.loads(gen.read_text())
        eos = g.get("eos_token_id")
        words = [w[0] for w in g.get("stop_words_ids") or [] if isinstance(w, list) and len(w) == 1]
        for e in ([eos] if isinstance(eos, int) else list(eos or [])) + words:
            if e not in cfg.eos_token_ids:
                cfg.eos_token_ids.append(e)


def _load_tokenizer(src: Source, hint: str = ""):
    """The checkpoint's tokenizer, read before the weights are converted so a remote-code one fails at once."""
    from transformers import AutoTokenizer

    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {"trust_remote_code": False}
    try:
        return AutoTokenizer.from_pretrained(src.path, **kw)
    except Exception as e:  # noqa: BLE001 - remote code, a missing vocabulary file: one message with the way out
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{src.path}: the tokenizer does not load without remote code ({why[:200]}); "
                         f"{hint or 'put a transformers tokenizer (tokenizer.json) beside the weights'}") from e


def _save_tokenizer(src: Source, out_dir: Path) -> None:
    _load_tokenizer(src).save_pretrained(out_dir)
