"""``rbe convert SRC --hf -o DIR``: a transformers folder with rbe codes, from any source rbe reads.

An HF directory is loaded by transformers itself (any architecture it builds); a GGUF or a lone
.safetensors file goes through rbe's own reader first (decoded to a temporary HF folder). The
output appears only when complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..models.spec import ModelError

#: Files besides weights and config that travel with the model (tokenizer, chat template, sentence-transformers).
_COMPANIONS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
               "vocab.txt", "merges.txt", "vocab.json", "modules.json", "sentence_bert_config.json",
               "config_sentence_transformers.json")


def load_hf(folder: Path):
    """The transformers model in ``folder`` (the class its ``config.json`` names, else ``AutoModel``), float32, eval."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    classes = [getattr(transformers, a, None) for a in (config.architectures or [])]
    cls = next((c for c in classes if c is not None), transformers.AutoModel)
    return cls.from_pretrained(folder, dtype="float32").eval()


def tokenizer_for(folder: Path):
    """A fast tokenizer from ``folder``'s tokenizer.json (None without one)."""
    from transformers import PreTrainedTokenizerFast

    tok = folder / "tokenizer.json"
    if not tok.is_file():
        return None
    out = PreTrainedTokenizerFast(tokenizer_file=str(tok))
    if out.pad_token is None:
        out.pad_token = out.eos_token or out.unk_token or out.convert_ids_to_tokens(0)
    return out


def convert_to_hf(src: str | os.PathLike, out: str | os.PathLike, codec=None, target_bpw: float | None = None, *,
                  calibration: str | os.PathLike | bool | None = None, calibration_tokens: int | None = None,
                  smoothing: bool = True, progress: bool = True) -> Path:
    """Write ``out`` (a new directory): the model of ``src`` compressed by ``rbe_core.hf.quantize``.

    ``calibration``: a text file, None for the built-in text (used under ``target_bpw`` or with a
    codec that takes calibration), False for none; ``smoothing`` as ``quantize``'s. Raises ``ModelError`` on bad input.
    """
    from ..compression.calibration import read_text, takes_calibration
    from ..registry import get_codec
    from .folder import quantization_config
    from .quantize import quantize

    src, out = Path(src), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"{out}: exists and is not an empty directory; nothing was written")
    if not src.exists():
        raise ModelError(f"{src}: no such file or directory")
    if quantization_config(src) is not None:
        raise ModelError(f"{src}: already holds rbe codes")
    parent = out.parent if out.parent.exists() else None
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        folder = src
        if not (src.is_dir() and (src / "config.json").is_file()):
            from ..compression.convert import compress_model, export_hf

            compress_model(src, work / "dense.rbe", codec={"id": "raw"}, calibration=False, progress=False)
            folder = export_hf(work / "dense.rbe", work / "dense")
        try:
            model = load_hf(folder)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"{src}: transformers cannot load it: {exc}") from exc
        text = tokenizer = None
        wants = target_bpw is not None or takes_calibration(get_codec(codec or "int8"))
        if calibration is not False and wants:
            tokenizer = tokenizer_for(folder)
            if tokenizer is not None:
                text = read_text(None if calibration is True else calibration)
        try:
            quantize(model, codec, target_bpw=target_bpw, calibration=text, tokenizer=tokenizer,
                     calibration_tokens=calibration_tokens, smoothing=smoothing, progress=progress)
        except ValueError as exc:
            raise ModelError(str(exc)) from exc
        staged = work / "out"
        model.save_pretrained(staged)
        for name in _COMPANIONS:
            if (folder / name).is_file():
                shutil.copy2(folder / name, staged / name)
        if out.exists():
            out.rmdir()
        os.replace(staged, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
