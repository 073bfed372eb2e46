"""Text for calibration and refinement: files, folders and built-in offline sources, deduplicated, split.

A data spec (``--data``) is one source or several joined with commas:

- a file (UTF-8 text) or a folder (every ``.txt``, ``.md``, ``.rst`` file under it, ``.gz`` ones
  decompressed, in sorted order);
- ``builtin:stdlib``: rbe's calibration text, CPython standard-library docstrings (PSF License);
- ``builtin:debian``: the prose Debian ships under ``/usr/share/doc`` (READMEs, notes, manuals in
  ``.txt``/``.md``/``.rst``, gzipped or not) — broad technical English from hundreds of projects;
- ``builtin:teacher``: text the float model writes itself (LLM-QAT's data-free recipe: a random
  first token, then sampling at temperature 1), generated when the data is loaded;
- ``builtin:broad``: stdlib + debian, + teacher where the float model is at hand (refinement).

Streaming: files are read one at a time and stop once ``max_chars`` are collected. Paragraphs
(blank-line separated, whitespace collapsed, at least 8 words, mostly letters) are deduplicated by
content hash; one paragraph in ``HELD_OUT`` (by hash, so the split is stable) goes to the held-out
text used for early stopping. Never used, whatever the spec: license texts (``copyright``,
``COPYING``, ``LICENSE`` files and ``/usr/share/common-licenses``, the texts rbe's quality
benchmarks evaluate on).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import attrs

from ..models.spec import ModelError

DEBIAN_DOCS = Path("/usr/share/doc")
#: Files and folders never read (evaluation texts and licenses).
EXCLUDED = re.compile(r"(^|/)(copyright|COPYING[^/]*|LICEN[CS]E[^/]*|common-licenses)(/|$)", re.IGNORECASE)
SUFFIXES = (".txt", ".md", ".rst")
#: One paragraph in this many (by content hash) is held out.
HELD_OUT = 20
TEACHER_TOKENS = 16384


@attrs.frozen
class TextData:
    """Deduplicated text: ``train`` and ``held_out`` (paragraphs joined by blank lines), characters per source."""

    train: str
    held_out: str
    sources: dict[str, int]


def _readable(path: Path) -> str | None:
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    return raw.decode("utf-8", errors="replace")


def _files(folder: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not EXCLUDED.search(d))
        for name in sorted(files):
            path = Path(root) / name
            base = name[:-3] if name.endswith(".gz") else name
            if EXCLUDED.search(str(path)) or not (base.endswith(SUFFIXES) or base.upper().startswith("README")):
                continue
            yield path


#: Longer blank-line blocks (files without blank lines) are cut at line ends into pieces of about this size.
MAX_PARAGRAPH = 2000


def _blocks(text: str) -> Iterator[str]:
    for part in re.split(r"\n\s*\n", text):
        if len(part) <= MAX_PARAGRAPH:
            yield part
            continue
        piece: list[str] = []
        for line in part.splitlines():
            piece.append(line)
            if sum(map(len, piece)) >= MAX_PARAGRAPH // 2:
                yield "\n".join(piece)
                piece = []
        if piece:
            yield "\n".join(piece)


def paragraphs(text: str, min_words: int = 8) -> Iterator[str]:
    """Prose paragraphs of ``text``: blank-line separated (long blocks cut at line ends),
    whitespace collapsed, ≥ ``min_words`` words, at least 70% letters and spaces (tables, code and
    logs are mostly dropped)."""
    for part in _blocks(text):
        p = " ".join(part.split())
        if len(p.split()) >= min_words and sum(c.isalpha() or c == " " for c in p) >= 0.7 * len(p):
            yield p


def teacher_text(model, tokens: int = TEACHER_TOKENS, length: int = 256, batch: int = 8, seed: int = 0) -> str:
    """Text sampled from the causal LM ``model`` (rbe's model class): ``tokens`` tokens in sequences of
    ``length``, each from a uniformly random first token, then temperature-1 sampling."""
    import torch

    from ..models.common import CausalLM

    if not isinstance(model, CausalLM) or model.tokenizer is None:
        raise ModelError("builtin:teacher needs a causal LM with a tokenizer")
    gen = torch.Generator().manual_seed(seed)
    vocab, out = model.config["vocab_size"], []
    with torch.no_grad():
        for _ in range(max(1, tokens // (length * batch))):
            ids = torch.randint(0, vocab, (batch, 1), generator=gen)
            seqs, past = [ids], None
            for _t in range(length - 1):
                logits, past = model(seqs[-1], past)
                seqs.append(torch.multinomial(torch.softmax(logits[:, -1].float(), -1), 1, generator=gen))
            rows = torch.cat(seqs, 1).tolist()
            out += [model.tokenizer.decode(r[1:]) for r in rows]
    return "\n\n".join(out)


def _source_texts(spec: str, model) -> Iterator[tuple[str, str]]:
    """(source name, text) pieces of one source, streamed."""
    from .calibration import DEFAULT_TEXT

    if spec in ("builtin:stdlib",):
        yield spec, DEFAULT_TEXT.read_text(encoding="utf-8")
    elif spec == "builtin:debian":
        for path in _files(DEBIAN_DOCS):
            text = _readable(path)
            if text:
                yield spec, text
    elif spec == "builtin:teacher":
        yield spec, teacher_text(model)
    elif spec == "builtin:broad":
        for part in ("builtin:stdlib", "builtin:debian", *(("builtin:teacher",) if model is not None else ())):
            yield from _source_texts(part, model)
    elif spec.startswith("builtin:"):
        raise ModelError(f"unknown data source {spec!r}; built-in: stdlib, debian, teacher, broad")
    else:
        path = Path(spec)
        if EXCLUDED.search(str(path.resolve())):
            raise ModelError(f"{path}: license texts are evaluation texts and never used as data")
        if path.is_dir():
            for f in _files(path):
                text = _readable(f)
                if text:
                    yield spec, text
        elif path.is_file():
            text = _readable(path)
            if text is None:
                raise ModelError(f"{path}: cannot read it")
            yield spec, text
        else:
            raise ModelError(f"{path}: no such file or directory")


def load(spec: str, *, model=None, max_chars: int = 4_000_000) -> TextData:
    """The data of ``spec`` (see the module docstring), at most ``max_chars`` characters of training text.
    ``model`` (rbe's float model) is needed by ``builtin:teacher``. ``ModelError`` on a bad spec or no text."""
    seen: set[bytes] = set()
    train, held, sources, size = [], [], {}, 0
    for part in [s.strip() for s in spec.split(",") if s.strip()]:
        for name, text in _source_texts(part, model):
            for p in paragraphs(text):
                key = hashlib.blake2b(p.encode(), digest_size=8).digest()
                if key in seen:
                    continue
                seen.add(key)
                (held if key[0] % HELD_OUT == 0 else train).append(p)
                sources[name] = sources.get(name, 0) + len(p)
                size += len(p)
            if size >= max_chars:
                break
        if size >= max_chars:
            break
    if not train or not held:
        raise ModelError(f"data {spec!r} holds too little prose (paragraphs of 8+ words) to train and hold out")
    return TextData("\n\n".join(train), "\n\n".join(held), sources)
