"""BERT family (all-MiniLM-L6-v2, ...): encoder with mean-pooled sentence embeddings.

Sentence-transformers folders add pooling and normalisation settings (``modules.json``,
``sentence_bert_config.json``); they arrive in ``extras`` and are kept in the config.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import RBEFFN, RBEAttention, layer_norm
from .common import LayerFactory, ModelError, RBEModel, Spec

_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "relu": "relu"}


class BertSpec(Spec):
    name = "bert"
    hf_model_types = ("bert",)
    ignored = ("*position_ids", "cls.*")

    @classmethod
    def from_hf_config(cls, hf, names, extras=None):
        extras = extras or {}
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ModelError(f"bert: position embeddings {hf['position_embedding_type']!r} are not supported")
        act = hf.get("hidden_act", "gelu")
        if act not in _ACT:
            raise ModelError(f"bert: activation {act!r} is not supported")
        return {
            "prefix": "bert." if any(n.startswith("bert.") for n in names) else "",
            "vocab_size": int(hf["vocab_size"]), "hidden_size": int(hf["hidden_size"]),
            "n_layers": int(hf["num_hidden_layers"]), "n_heads": int(hf["num_attention_heads"]),
            "intermediate_size": int(hf["intermediate_size"]), "max_position": int(hf["max_position_embeddings"]),
            "type_vocab_size": int(hf.get("type_vocab_size", 2)), "eps": float(hf.get("layer_norm_eps", 1e-12)),
            "activation": _ACT[act], "pad_token_id": int(hf.get("pad_token_id") or 0),
            "normalize": bool(extras.get("normalize", False)),
            "max_seq_length": int(extras.get("max_seq_length") or hf["max_position_embeddings"]),
            "hf_config": dict(hf),
        }

    @classmethod
    def expected(cls, cfg):
        p, h, i_sz = cfg["prefix"], cfg["hidden_size"], cfg["intermediate_size"]
        e = f"{p}embeddings."
        req: dict[str, tuple[int, ...]] = {
            f"{e}word_embeddings.weight": (cfg["vocab_size"], h),
            f"{e}position_embeddings.weight": (cfg["max_position"], h),
            f"{e}token_type_embeddings.weight": (cfg["type_vocab_size"], h),
            f"{e}LayerNorm.weight": (h,), f"{e}LayerNorm.bias": (h,),
        }
        for i in range(cfg["n_layers"]):
            b = f"{p}encoder.layer.{i}."
            for lin in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
                req.update({f"{b}{lin}.weight": (h, h), f"{b}{lin}.bias": (h,)})
            req.update({
                f"{b}intermediate.dense.weight": (i_sz, h), f"{b}intermediate.dense.bias": (i_sz,),
                f"{b}output.dense.weight": (h, i_sz), f"{b}output.dense.bias": (h,),
            })
            for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
                req.update({f"{b}{ln}.weight": (h,), f"{b}{ln}.bias": (h,)})
        return req, {f"{p}pooler.dense.weight": (h, h), f"{p}pooler.dense.bias": (h,)}

    @classmethod
    def model_class(cls):
        return BertEncoder


class _Layer(nn.Module):
    def __init__(self, cfg, f: LayerFactory, b: str):
        super().__init__()
        h, eps = cfg["hidden_size"], cfg["eps"]
        lin = lambda n: f.linear(f"{b}{n}.weight", f"{b}{n}.bias")  # noqa: E731
        self.attn = RBEAttention(q=lin("attention.self.query"), k=lin("attention.self.key"),
                                 v=lin("attention.self.value"), o=lin("attention.output.dense"),
                                 n_heads=cfg["n_heads"], head_dim=h // cfg["n_heads"], causal=False)
        ln = lambda n: layer_norm(f.param(f"{b}{n}.weight"), f.param(f"{b}{n}.bias"), eps)  # noqa: E731
        self.ln_attn = ln("attention.output.LayerNorm")
        self.ffn = RBEFFN(up=lin("intermediate.dense"), down=lin("output.dense"), activation=cfg["activation"])
        self.ln_out = ln("output.LayerNorm")

    def forward(self, x, mask):
        x = self.ln_attn(x + self.attn(x, key_padding_mask=mask)[0])
        return self.ln_out(x + self.ffn(x))


class BertEncoder(RBEModel):
    spec = BertSpec

    def __init__(self, cfg, f: LayerFactory, tokenizer=None):
        super().__init__(cfg, tokenizer)
        e = f"{cfg['prefix']}embeddings."
        self.word = f.embedding(f"{e}word_embeddings.weight")
        self.position = f.embedding(f"{e}position_embeddings.weight")
        self.token_type = f.embedding(f"{e}token_type_embeddings.weight")
        self.ln = layer_norm(f.param(f"{e}LayerNorm.weight"), f.param(f"{e}LayerNorm.bias"), cfg["eps"])
        self.layers = nn.ModuleList(_Layer(cfg, f, f"{cfg['prefix']}encoder.layer.{i}.") for i in range(cfg["n_layers"]))
        if self.tokenizer is not None:
            self.tokenizer.enable_padding(pad_id=cfg["pad_token_id"])
            self.tokenizer.enable_truncation(cfg["max_seq_length"])

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The last hidden states (batch, time, hidden)."""
        if ids.shape[1] > self.config["max_position"]:
            raise ModelError(f"input of {ids.shape[1]} tokens exceeds the model's {self.config['max_position']} positions")
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        types = torch.zeros_like(ids) if token_type_ids is None else token_type_ids
        x = self.word(ids) + self.position(torch.arange(ids.shape[1], device=ids.device))[None] + self.token_type(types)
        x = self.ln(x)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Mean-pooled (and, for sentence-transformers models, L2-normalised) embeddings (n, hidden)."""
        if isinstance(texts, str):
            texts = [texts]
        batch = self._require_tokenizer().encode_batch(list(texts))
        ids = torch.tensor([b.ids for b in batch])
        mask = torch.tensor([b.attention_mask for b in batch])
        types = torch.tensor([b.type_ids for b in batch])
        hidden = self(ids, mask, types)
        m = mask[..., None].float()
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1) if self.config["normalize"] else pooled
