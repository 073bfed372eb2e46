"""BERT family (all-MiniLM-L6-v2, ...): encoder with mean-pooled sentence embeddings.

Sentence-transformers folders add pooling and normalisation settings (``modules.json``,
``sentence_bert_config.json``); they arrive in ``extras`` and are kept in the config.
"""

from __future__ import annotations

from ..spec import ModelError, Spec

_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "relu": "relu"}


class BertSpec(Spec):
    name = "bert"
    hf_model_types = ("bert",)
    causal = False
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
