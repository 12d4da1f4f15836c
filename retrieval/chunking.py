"""Documents into passages: ~100-word chunks with overlap, stable ids, titles kept; and the
file formats a collection accepts (.txt, .md, .jsonl).

A passage id is `doc_id#chunk`; a document without an id gets one from its content
(the first 16 hex digits of SHA-1 over title and text), so adding the same file twice
replaces rather than duplicates it.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

CHUNK_WORDS = 100
CHUNK_OVERLAP = 20
MAX_DOC_ID = 200
UPLOAD_SUFFIXES = (".txt", ".md", ".jsonl")


class DocumentError(ValueError):
    """A document the store cannot take; `status` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Passage:
    id: str  # doc_id#chunk
    doc_id: str
    chunk: int
    title: str
    text: str
    metadata: dict[str, Any]


def content_id(title: str, text: str) -> str:
    return hashlib.sha1(f"{title}\n{text}".encode("utf-8")).hexdigest()[:16]


def make_document(raw: dict[str, Any], max_chars: int) -> Document:
    """Validate one `{id?, title, text, metadata?}` object; DocumentError (400/413) if bad."""
    if not isinstance(raw, dict):
        raise DocumentError("each document must be an object with `title` and `text`")
    unknown = set(raw) - {"id", "title", "text", "metadata"}
    if unknown:
        raise DocumentError(f"unknown document fields: {sorted(unknown)}")
    text, title = raw.get("text"), raw.get("title", "")
    if not isinstance(text, str) or not text.strip():
        raise DocumentError("document `text` must be a non-empty string")
    if not isinstance(title, str):
        raise DocumentError("document `title` must be a string")
    if len(text) > max_chars:
        raise DocumentError(f"document text has {len(text)} characters; the limit is {max_chars}", 413)
    metadata = raw.get("metadata")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise DocumentError("document `metadata` must be an object")
    doc_id = raw.get("id")
    if doc_id is None:
        doc_id = content_id(title, text)
    if not isinstance(doc_id, str) or not doc_id or len(doc_id) > MAX_DOC_ID or "#" in doc_id or "/" in doc_id:
        raise DocumentError(f"document `id` must be 1-{MAX_DOC_ID} characters without '#' or '/'")
    return Document(doc_id, title.strip(), text, metadata)


def chunk_document(doc: Document, words: int = CHUNK_WORDS, overlap: int = CHUNK_OVERLAP) -> list[Passage]:
    """Windows of `words` words that overlap by `overlap` (a fact cut at a boundary stays
    whole in one of them); the last window is never a short tail of the previous one."""
    tokens = doc.text.split()
    stride = max(1, words - overlap)
    starts = list(range(0, max(1, len(tokens) - overlap), stride))
    return [Passage(f"{doc.id}#{i}", doc.id, i, doc.title, " ".join(tokens[s:s + words]), doc.metadata)
            for i, s in enumerate(starts)]


def parse_upload(filename: str, data: bytes, max_chars: int) -> list[Document]:
    """Documents of one uploaded file: .txt and .md are one document each (title: the first
    Markdown heading, else the file name), .jsonl one per line. DocumentError 415 otherwise."""
    name = filename.rsplit("/", 1)[-1]
    suffix = name[name.rfind("."):].lower() if "." in name else ""
    if suffix not in UPLOAD_SUFFIXES:
        raise DocumentError(f"unsupported file type {suffix or name!r}; upload {', '.join(UPLOAD_SUFFIXES)}", 415)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentError(f"{name} is not UTF-8 text") from exc
    if suffix == ".jsonl":
        docs = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(make_document(json.loads(line), max_chars))
            except json.JSONDecodeError as exc:
                raise DocumentError(f"{name} line {number}: not JSON ({exc.msg})") from exc
            except DocumentError as exc:
                raise DocumentError(f"{name} line {number}: {exc}", exc.status) from exc
        if not docs:
            raise DocumentError(f"{name} holds no documents")
        return docs
    heading = re.search(r"^#\s+(.+)$", text, re.MULTILINE) if suffix == ".md" else None
    title = heading.group(1).strip() if heading else name.rsplit(".", 1)[0]
    return [make_document({"id": name.rsplit(".", 1)[0] or None, "title": title, "text": text}, max_chars)]
