"""What a model family is to the converter, and the one reader that turns any family's checkpoint into the engine's
per-layer tensors. The families themselves are data, in cluster/convert/families.py.

A layer's tensors come out in engine meaning, full size (not yet sliced for a rank): q, k, v, o, gate, up, down,
ln1, ln2, their biases as q_b, k_b, v_b, o_b, ln1_b, ln2_b, q_norm / k_norm (per-head norms), and for expert layers
router, e_gate, e_up [E, F, H], e_down [E, H, F] (+ the shared expert's gate, up, down, shared_gate; router_bias).
Multi-head latent attention layers (DeepSeek-V2/V3) have wq (or wq_a, q_a_norm, wq_b), wkv_a, kv_a_norm, wkv_b
and o instead of q, k, v (cluster/convert/mla.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from cluster.models.config import ModelConfig

if TYPE_CHECKING:  # the entries and config checks import without torch (cluster/cli_args.py checks a model with them)
    import torch

Getter = Callable[[str], "torch.Tensor"]
Tensors = dict[str, "torch.Tensor"]

# keys a family's `layer` template may hold that stand for several engine tensors in one checkpoint tensor
FUSED = ("qkv", "qkv_grouped", "gate_up")
MLP_KEYS = ("gate", "up", "down", "gate_up")
QKV_KEYS = ("q", "k", "v", "qkv", "qkv_grouped")
NORM_KEYS = ("ln1", "ln2")
LINEAR_KEYS = ("q", "k", "v", "o", "gate", "up", "down") + FUSED


@dataclass(frozen=True)
class Experts:
    """Where an expert layer's tensors live, relative to the layer prefix. `prefix` lists the names the expert block
    has had (transformers 5 renamed Mixtral's block_sparse_moe to mlp); the first the checkpoint holds wins."""

    prefix: tuple[str, ...] = ("mlp.",)
    router: str = "gate"
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per expert: gate, up, down
    shared: str = ""  # the always-on expert's module (Qwen2-MoE: "shared_expert."), "" for none
    shared_gate: str = ""  # its sigmoid gate (Qwen2-MoE: "shared_expert_gate"), "" when ungated
    router_bias: str = ""  # the router's choice-only bias (DeepSeek-V3: "gate.e_score_correction_bias"), a tensor
    read: Callable[[Getter, ModelConfig, str], Tensors] | None = None  # a layout no template says (Dbrx)


@dataclass(frozen=True)
class Family:
    """One model family, declared: tensor-name templates, the config keys that differ from Llama's, the engine
    features it turns on, and hooks for what a template cannot say.

    layer: engine key -> module path under `prefix` (".weight" and, where the config has them, ".bias" are
    appended), or a tuple of the paths checkpoints of the family use (the first one present is read). Fused keys: "qkv" ([q; k; v] rows), "qkv_grouped" (per KV head [q x group, k, v], InternLM2 and
    Falcon), "gate_up" ([gate; up] rows). Hooks run on every view of a layer the quantized paths read (4-bit q
    values, zeros, scales; e4m3 values, scales), so a layer hook may only rearrange rows or touch norms."""

    name: str
    model_types: tuple[str, ...]
    layer: dict[str, str | tuple[str, ...]]
    prefix: str = "model.layers.{i}."
    embed: str = "model.embed_tokens"
    head: str = "lm_head"
    norm: str = "model.norm"
    keys: dict[str, str | tuple[str, ...]] = field(default_factory=dict)  # Llama config key -> this family's
    fields: dict = field(default_factory=dict)  # ModelConfig fields every checkpoint of the family has
    experts: Experts | None = None
    view_hook: Callable[[dict], None] | None = None  # the Llama-keyed view, in place: values no key copies
    config_hook: Callable[[dict], dict] | None = None  # the Llama-keyed view -> more ModelConfig fields (or refuse)
    layer_hook: Callable[[Tensors, ModelConfig, int], None] | None = None  # in place, after reading a layer
    model_hook: Callable[[Tensors, ModelConfig], None] | None = None  # in place, on embed / head / norm
    tokenizer_hint: str = ""  # what to do when the checkpoint's tokenizer is remote code
    optional: tuple[str, ...] = ()  # `layer` keys read where the checkpoint has them (DeepSeek: q_proj or q_a_proj)


def config_view(fam: Family, hf: dict) -> dict:
    """The checkpoint's config under Llama's keys (what the rest of the converter reads); idempotent."""
    if hf.get("_family") == fam.name:
        return hf
    view = dict(hf)
    for ours, theirs in fam.keys.items():
        for k in (theirs,) if isinstance(theirs, str) else theirs:
            if k in hf and hf[k] is not None:
                view[ours] = hf[k]
                break
    if fam.view_hook:
        fam.view_hook(view)
    view["_family"] = fam.name
    return view


def split_qkv(w: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, kv = cfg.num_heads * cfg.src_head_dim, cfg.num_kv_heads * cfg.src_head_dim
    return w[:q], w[q:q + kv], w[q + kv:q + 2 * kv]


def split_qkv_grouped(w: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows packed per KV head: [q heads of the group, k, v] (InternLM2's wqkv, Falcon's query_key_value)."""
    group = cfg.num_heads // cfg.num_kv_heads
    x = w.view(cfg.num_kv_heads, group + 2, cfg.src_head_dim, *w.shape[1:])
    return (x[:, :group].reshape(-1, *w.shape[1:]), x[:, group].reshape(-1, *w.shape[1:]),
            x[:, group + 1].reshape(-1, *w.shape[1:]))


def _read(key: str, w: torch.Tensor, cfg: ModelConfig, suffix: str = "") -> Tensors:
    if key == "qkv":
        return dict(zip((k + suffix for k in "qkv"), split_qkv(w, cfg)))
    if key == "qkv_grouped":
        return dict(zip((k + suffix for k in "qkv"), split_qkv_grouped(w, cfg)))
    if key == "gate_up":
        gate, up = w.chunk(2, dim=0)
        return {"gate" + suffix: gate, "up" + suffix: up}
    return {key + suffix: w}


def _has_bias(key: str, cfg: ModelConfig) -> bool:
    return ((key in QKV_KEYS and cfg.attention_bias) or (key == "o" and cfg.o_bias)
            or (key in NORM_KEYS and cfg.norm_bias))


def read_layer(fam: Family, get: Getter, cfg: ModelConfig, i: int) -> Tensors:
    """Layer i's full tensors in engine meaning (q, k, v apart, so each rank can slice them)."""
    p = fam.prefix.format(i=i)
    sparse = cfg.is_sparse(i)
    names = getattr(get, "names", set())
    t: Tensors = {}
    for key, module in fam.layer.items():
        if (sparse and key in MLP_KEYS) or (key == "ln2" and cfg.parallel_attn and not cfg.mlp_norm):
            continue
        if not isinstance(module, str):
            module = next((m for m in module if p + m + ".weight" in names), module[0])
        if key in fam.optional and p + module + ".weight" not in names:
            continue
        t.update(_read(key, get(p + module + ".weight"), cfg))
        if _has_bias(key, cfg):
            t.update(_read(key, get(p + module + ".bias"), cfg, "_b"))
    if sparse:
        t.update(read_experts(fam.experts, get, cfg, p))
    if fam.layer_hook:
        fam.layer_hook(t, cfg, i)
    return t


def read_experts(spec: Experts, get: Getter, cfg: ModelConfig, layer_prefix: str) -> Tensors:
    """Gate, up [E, F, H] and down [E, H, F] stacked over experts, the router, and the shared expert. Reads
    per-expert checkpoints (what Mixtral and Qwen ship, and what transformers 4 saves) and transformers 5's fused
    3D layout (experts.gate_up_proj [E, 2F, H], experts.down_proj [E, H, F])."""
    import torch

    names = getattr(get, "names", set())
    if spec.read is not None:
        return spec.read(get, cfg, layer_prefix)
    p = layer_prefix + next((c for c in spec.prefix if layer_prefix + c + spec.router + ".weight" in names),
                            spec.prefix[0])
    if p + "experts.gate_up_proj" in names:
        gate, up = get(p + "experts.gate_up_proj").chunk(2, dim=1)
        down = get(p + "experts.down_proj")
    else:
        experts = range(cfg.num_experts)
        gate, up, down = (torch.stack([get(f"{p}experts.{e}.{n}.weight") for e in experts]) for n in spec.names)
    t = {"router": get(p + spec.router + ".weight"), "e_gate": gate, "e_up": up, "e_down": down}
    if cfg.shared_expert_intermediate_size:
        s = p + spec.shared
        t.update(gate=get(s + "gate_proj.weight"), up=get(s + "up_proj.weight"), down=get(s + "down_proj.weight"))
        if spec.shared_gate:
            t["shared_gate"] = get(p + spec.shared_gate + ".weight")
    if spec.router_bias and cfg.router_bias:
        t["router_bias"] = get(p + spec.router_bias)
    return t


def read_model(fam: Family, get: Getter, cfg: ModelConfig) -> Tensors:
    """The tensors outside the layers: embed, head (absent when tied), norm (+ norm_b for a LayerNorm with bias)."""
    t = {"embed": get(fam.embed + ".weight"), "norm": get(fam.norm + ".weight")}
    if not cfg.tie_word_embeddings:
        t["head"] = get(fam.head + ".weight")
    if cfg.norm_bias:
        t["norm_b"] = get(fam.norm + ".bias")
    if fam.model_hook:
        fam.model_hook(t, cfg)
    return t
