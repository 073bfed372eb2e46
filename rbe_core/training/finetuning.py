"""Fine-tuning a compressed model's codec parameters on a text file (``rbe finetune``).

The model's ``RBELinear`` layers become trainable (``training.prepare_for_training``: codec
parameters through a derivative engine, or shadow weights through a quantizer); so do untied
``RBEEmbedding`` tables when no quantizer is given (a tied table follows its head); linear biases
train too when the file stores them under ``<weight name minus "weight">bias``. Losses:

- causal LM: with a teacher, KL(teacher ‖ student) of the next-token distributions at every
  position; without one, next-token cross-entropy;
- encoder: with a teacher, ``(1 − cos) + relative MSE`` of the last hidden states per token;
  without one, an in-batch contrastive loss (InfoNCE, τ = 0.05) between the mean-pooled
  embeddings of the two halves of each window.

Batches are windows of ``seq_len`` tokens drawn at random from the tokenized file with a
generator seeded by ``(seed, step)``, so a resumed run sees the same batches as an uninterrupted one.

Checkpoints (every ``checkpoint_every`` steps) go to ``<out>.ckpt/step-NNNNNNN/``: ``model.rbe``
(a valid model file of the current state), ``state.safetensors`` (trainable parameters and
optimizer state) and ``state.json`` (step, loss history, settings); no pickle. Each is written
into a temporary folder renamed into place when complete; older checkpoints are then removed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from ..abc import Encoded
from ..compression.evaluate import reference_model
from ..container import save
from ..files import open as open_rbe
from ..layers import RBEEmbedding, RBELinear
from ..models.build import build_model
from ..models.common import CausalLM, RBEModel
from ..models.spec import ModelError
from ..registry import get_backend
from .trainable import QATLinear, finalize, prepare_for_training

CHECKPOINT_FORMAT = 1
#: Settings a resumed run must share with the run that wrote the checkpoint.
_RESUME_KEYS = ("lr", "batch_tokens", "seq_len", "engine", "quantizer", "seed", "teacher", "data")


@attrs.frozen
class FinetuneResult:
    """What a fine-tuning run did: ``path`` written, first/last ``step`` run, per-step ``losses``
    (of the whole run, resumed steps included), wall ``seconds`` of the steps run in this call."""

    path: Path
    start_step: int
    steps: int
    losses: list[float]
    seconds: float


def _tokenizer(model: RBEModel):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(model._require_tokenizer().to_str())
    tok.no_truncation()
    tok.no_padding()
    return tok


def token_windows(model: RBEModel, text: str, seq_len: int) -> tuple[np.ndarray, list[int], list[int]]:
    """(token ids of ``text`` without special tokens, prefix, suffix): a training sequence is
    ``prefix + window + suffix`` (the tokenizer's own special tokens, e.g. BERT's [CLS] ... [SEP])."""
    tok = _tokenizer(model)
    ids = np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    specials = tok.encode("").ids
    prefix, suffix = specials[:1], specials[1:]
    body = seq_len - len(prefix) - len(suffix)
    limit = int(model.config["max_position"])
    if seq_len > limit:
        raise ModelError(f"--seq-len {seq_len} exceeds the model's {limit} positions")
    if body < 2 or len(ids) < body:
        raise ModelError(f"the data has {len(ids)} tokens; windows of {seq_len} need at least {max(body, 2)}")
    return ids, prefix, suffix


def batch_ids(ids: np.ndarray, prefix: list[int], suffix: list[int], seq_len: int, n: int, seed: int,
              step: int) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens for ``step``, drawn by a generator seeded with (seed, step)."""
    body = seq_len - len(prefix) - len(suffix)
    starts = np.random.default_rng([seed, step]).integers(0, len(ids) - body + 1, n)
    rows = [np.concatenate([prefix, ids[s:s + body], suffix]) for s in starts]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def _forward(model: RBEModel, ids: torch.Tensor) -> torch.Tensor:
    return model(ids)[0] if isinstance(model, CausalLM) else model(ids)


def loss_fn(model: RBEModel, ids: torch.Tensor, teacher: RBEModel | None = None) -> torch.Tensor:
    """The training loss of one batch (see the module docstring)."""
    if teacher is not None:
        with torch.no_grad():
            target = _forward(teacher, ids).float()
        out = _forward(model, ids).float()
        if isinstance(model, CausalLM):
            return F.kl_div(F.log_softmax(out.flatten(0, 1), -1), F.log_softmax(target.flatten(0, 1), -1),
                            reduction="batchmean", log_target=True)
        cos = F.cosine_similarity(out, target, dim=-1).mean()
        return (1 - cos) + F.mse_loss(out, target) / target.pow(2).mean().clamp_min(1e-12)
    if isinstance(model, CausalLM):
        logits = model(ids[:, :-1])[0].float()
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    if ids.shape[0] < 2:
        raise ModelError("an encoder without a teacher trains contrastively: give --batch-tokens >= 2 x --seq-len")
    half = ids.shape[1] // 2
    a = F.normalize(model(ids[:, :half]).mean(1), dim=-1)
    b = F.normalize(model(ids[:, half:]).mean(1), dim=-1)
    return F.cross_entropy(a @ b.T / 0.05, torch.arange(ids.shape[0]))


class _Trainee:
    """A loaded model prepared for training, with the map back to the file's tensor names."""

    def __init__(self, path, engine: str, quantizer: str | None, backend: str | None):
        f = open_rbe(path)
        self.metadata = dict(f.metadata)
        self.tensors: dict[str, Encoded] = {n: f[n] for n in f}
        self.model = build_model(self.metadata, self.tensors, get_backend(backend))
        by_id = {id(enc): n for n, enc in self.tensors.items()}
        linears = {m: mod for m, mod in self.model.named_modules() if isinstance(mod, RBELinear)}
        self.layer_tensor = {m: by_id[id(mod.encoded)] for m, mod in linears.items()}
        embeddings = [(mod, by_id.get(id(mod.encoded))) for mod in self.model.modules() if isinstance(mod, RBEEmbedding)]
        self.biases = {m: self._bias_name(mod, self.layer_tensor[m]) for m, mod in linears.items()}
        emb_names = {m: by_id.get(id(mod.encoded)) for m, mod in self.model.named_modules()
                     if isinstance(mod, RBEEmbedding)}
        prepared = prepare_for_training(self.model, engine=engine, quantizer=quantizer)
        # untied embeddings train their own codec parameters; tied ones follow the head (below)
        self.embedding_tensor = {m: n for m, n in emb_names.items() if m in prepared and n is not None}
        modules = dict(self.model.named_modules())
        for m, name in self.biases.items():
            if name is not None:
                modules[m].bias.requires_grad_(True)
            elif modules[m].bias is not None:
                modules[m].bias.requires_grad_(False)
        # an embedding sharing a trained matrix (tied lm_head) follows it every forward
        for emb, name in embeddings:
            trained = [modules[m] for m, n in self.layer_tensor.items() if n == name]
            if trained:
                _tie(emb, trained[0])
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.model.train()

    def _bias_name(self, layer: RBELinear, weight: str) -> str | None:
        """The stored name of ``layer``'s bias, when the file holds it next to its ``weight``."""
        if layer.bias is None:
            return None
        name = weight[: -len("weight")] + "bias" if weight.endswith("weight") else None
        if name in self.tensors and np.array_equal(self.tensors[name].decode(), layer.bias.detach().numpy()):
            return name
        return None

    def snapshot(self, layers: Mapping[str, Encoded] | None = None) -> dict[str, Encoded]:
        """All tensors of the model file with the current trained values (``layers``: finalized ones)."""
        modules = dict(self.model.named_modules())
        out = dict(self.tensors)
        for m, name in [*self.layer_tensor.items(), *self.embedding_tensor.items()]:
            out[name] = layers[m] if layers is not None else modules[m].finalize().encoded
        for m, name in self.biases.items():
            if name is not None:
                old = self.tensors[name]
                bias = modules[m].bias.detach().numpy().astype(np.float32)
                out[name] = old.codec.encode(bias.reshape(old.shape), source=old.source)
        return out


def _tie(embedding: RBEEmbedding, head) -> None:
    """Make ``embedding`` read the matrix ``head`` trains: the trained codes (codec parameters),
    or rows of the quantized shadow weight with the gradient flowing into it (QAT)."""
    if isinstance(head, QATLinear):
        embedding.register_forward_hook(lambda _mod, args, _out: F.embedding(args[0], head.quantized_weight()))
    else:
        embedding.register_forward_pre_hook(lambda mod, _args: setattr(mod, "encoded", head.encoded))


def _write_checkpoint(ckpt_dir: Path, step: int, trainee: _Trainee, opt: torch.optim.Optimizer,
                      state: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:07d}"
    tmp = ckpt_dir / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save(tmp / "model.rbe", trainee.snapshot(), trainee.metadata)
        tensors = {f"param/{n}": p.detach().contiguous() for n, p in trainee.params.items()}
        extra: dict[str, Any] = {}
        for i, s in opt.state_dict()["state"].items():
            for key, value in s.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"opt/{i}/{key}"] = value.detach().contiguous()
                else:
                    extra[f"{i}/{key}"] = value
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "optimizer_scalars": extra}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in ckpt_dir.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder in ``ckpt_dir``, or None."""
    done = sorted(p for p in Path(ckpt_dir).glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def _load_checkpoint(path: Path, trainee: _Trainee, opt: torch.optim.Optimizer, settings: dict) -> dict:
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path}: unsupported checkpoint format {state.get('format')!r}")
    saved = state["settings"]
    changed = [f"{k} (checkpoint: {saved.get(k)!r})" for k in _RESUME_KEYS if saved.get(k) != settings.get(k)]
    if changed:
        raise ModelError(f"{path}: cannot resume with a different {', '.join(changed)}")
    tensors = load_file(str(path / "state.safetensors"))
    with torch.no_grad():
        for n, p in trainee.params.items():
            p.copy_(tensors[f"param/{n}"])
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt/"):
            _, i, field = key.split("/", 2)
            opt_state.setdefault(int(i), {})[field] = value
    for key, value in state["optimizer_scalars"].items():
        i, field = key.split("/", 1)
        opt_state.setdefault(int(i), {})[field] = value
    sd = opt.state_dict()
    sd["state"] = opt_state
    opt.load_state_dict(sd)
    return state


def finetune(model_path: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *, steps: int,
             teacher: str | os.PathLike | None = None, lr: float = 1e-3, batch_tokens: int = 1024,
             seq_len: int = 128, engine: str = "autograd", quantizer: str | None = None,
             checkpoint_every: int = 0, checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
             seed: int = 0, backend: str | None = None, progress: bool = True) -> FinetuneResult:
    """Fine-tune the codec parameters of the .rbe model ``model_path`` on the text file ``data``
    for ``steps`` Adam steps and write the result to ``out`` (same metadata, config and tokenizer).

    ``teacher`` (an .rbe or source model) switches to distillation. ``checkpoint_every`` > 0 writes
    a checkpoint every that many steps; ``resume`` continues from the newest one (a fresh start
    when there is none). Raises ``ModelError`` on bad input; ``out`` appears only when complete.
    """
    if steps < 1 or lr <= 0 or seq_len < 2 or batch_tokens < seq_len or checkpoint_every < 0:
        raise ModelError(f"need steps >= 1, lr > 0, seq_len >= 2, batch_tokens >= seq_len, checkpoint_every >= 0 "
                         f"(got {steps}, {lr}, {seq_len}, {batch_tokens}, {checkpoint_every})")
    out = Path(out)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out.with_name(out.name + ".ckpt")
    settings = {"model": str(model_path), "data": str(data), "teacher": None if teacher is None else str(teacher),
                "lr": lr, "batch_tokens": batch_tokens, "seq_len": seq_len, "engine": engine,
                "quantizer": quantizer, "seed": seed, "steps": steps}
    trainee = _Trainee(model_path, engine, quantizer, backend)
    model = trainee.model
    if not trainee.params:
        raise ModelError(f"{model_path}: the model has no trainable compressed layers")
    teacher_model = None if teacher is None else reference_model(teacher)
    if teacher_model is not None and (type(teacher_model) is not type(model)
                                      or teacher_model.config.get("vocab_size") != model.config.get("vocab_size")):
        raise ModelError(f"teacher {teacher} is not the same architecture and vocabulary as {model_path}")
    ids, prefix, suffix = token_windows(model, Path(data).read_text(encoding="utf-8"), seq_len)
    n_seq = max(1, batch_tokens // seq_len)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(list(trainee.params.values()), lr=lr)
    losses: list[float] = []
    start = 0
    found = latest_checkpoint(ckpt_dir) if resume else None
    if found is not None:
        state = _load_checkpoint(found, trainee, opt, settings)
        start, losses = state["step"], list(state["losses"])
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=min(start, steps), desc="rbe finetune", unit="step", disable=not progress,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for step in range(start, steps):
            batch = batch_ids(ids, prefix, suffix, seq_len, n_seq, seed, step)
            loss = loss_fn(model, batch, teacher_model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            bar.update(1)
            done = step + 1
            if checkpoint_every and (done % checkpoint_every == 0 or done == steps):
                state = {"format": CHECKPOINT_FORMAT, "step": done, "losses": losses, "settings": settings}
                _write_checkpoint(ckpt_dir, done, trainee, opt, state)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    model.eval()
    trained = finalize(model)
    path = save(out, trainee.snapshot(trained), trainee.metadata)
    return FinetuneResult(path, start, steps, losses, seconds)


__all__ = ["FinetuneResult", "batch_ids", "finetune", "latest_checkpoint", "loss_fn", "token_windows"]
