"""RAG as a prompt method: retrieve passages for the request's question, put them, numbered,
into the prompt, and report what was retrieved and which passages the answer cites.

It changes only the prompt (and, in `extractive` mode, adds a token constraint: the answer
is a span of the passages), so it composes with an adapter, DoLa, GenARM and best-of-N,
which see an ordinary request. Retrieval (embedding and faiss search) runs in the request's
preparing worker thread, never on the engine thread or the event loop.
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.methods.extractive import SpanConstraint

MAX_TOP_K = 100
CITE_INSTRUCTION = "Cite the passages you use by their numbers in brackets, like [1]."
EXTRACTIVE_INSTRUCTION = "Answer with a short phrase copied exactly from the passages."
_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


class RAGOptions(BaseModel):
    """`rag`: retrieval-augmented generation over a collection (POST /v1/indexes)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    index: str = Field(min_length=1, max_length=64)
    top_k: int = Field(4, ge=1, le=MAX_TOP_K)
    min_score: float | None = Field(None, ge=-1.0, le=1.0)  # cosine similarity floor
    cite: bool = True
    mode: Literal["generate", "extractive"] = "generate"


class RAG:
    """One request's retrieval: built by the API layer, which calls `retrieve`, then one of
    the `rewrite_*` methods, then `constraint`, and at the end `report`."""

    name = "rag"

    def __init__(self, options: RAGOptions, retrieval) -> None:
        self.options = options
        self.retrieval = retrieval
        self.query = ""
        self.hits: list = []

    def retrieve(self, query: str) -> None:
        """Blocking: embed `query` and search. StoreError (404 unknown index) propagates."""
        self.query = query
        o = self.options
        self.hits = self.retrieval.search(o.index, query, o.top_k, o.min_score) if query.strip() else []

    def context(self) -> str:
        """The numbered passages and the instructions, as the prompt carries them."""
        lines = ["Use the numbered passages below to answer the question."]
        if self.options.mode == "extractive":
            lines.append(EXTRACTIVE_INSTRUCTION)
        elif self.options.cite:
            lines.append(CITE_INSTRUCTION)
        # NOTE: extractive prompts carry no [i] markers: a model that wants to write "[1]" would
        # otherwise copy a bare "1" out of the passages.
        extractive = self.options.mode == "extractive"
        passages = [("" if extractive else f"[{i}] ") + (f"{h.passage.title}: " if h.passage.title else "")
                    + h.passage.text for i, h in enumerate(self.hits, 1)]
        return "\n".join(lines) + "\n\n" + "\n\n".join(passages)

    def rewrite_chat(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The last user turn becomes passages + question (a small model attends to passages
        next to the question far better than to a distant system prompt)."""
        if not self.hits:
            return messages
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        out = [dict(m) for m in messages]
        out[last]["content"] = f"{self.context()}\n\nQuestion: {messages[last]['content']}"
        return out

    def rewrite_completion(self, prompt: str) -> str:
        return f"{self.context()}\n\n{prompt}" if self.hits else prompt

    def constraint(self, tokenizer, end_token_ids) -> SpanConstraint | None:
        """Extractive mode: the answer is a span of one passage's tokens that starts at a word."""
        if self.options.mode != "extractive" or not self.hits:
            return None
        sequences = [tokenizer.encode(h.passage.text) for h in self.hits]
        can_start = [[j == 0 or tokenizer.token_str(t)[:1].isspace() for j, t in enumerate(ids)] for ids in sequences]
        return SpanConstraint(sequences, tuple(end_token_ids), can_start)

    def citations(self, text: str) -> tuple[list[int], list[int]]:
        """(valid markers, markers naming no passage), in order of first appearance. In
        extractive mode the answer cites, by construction, the passages that contain it."""
        if self.options.mode == "extractive":
            span = text.strip()
            return [i for i, h in enumerate(self.hits, 1) if span and span in h.passage.text], []
        markers = list(dict.fromkeys(int(n) for group in _CITATION.findall(text) for n in group.split(",")))
        return ([m for m in markers if 1 <= m <= len(self.hits)],
                [m for m in markers if not 1 <= m <= len(self.hits)])

    def report(self, texts: dict[int, str]) -> dict[str, Any]:
        passages = [{"marker": i, "id": h.passage.id, "doc_id": h.passage.doc_id, "title": h.passage.title,
                     "score": round(h.score, 6)} for i, h in enumerate(self.hits, 1)]
        out: dict[str, Any] = {"index": self.options.index, "mode": self.options.mode, "top_k": self.options.top_k,
                               "passages": passages}
        per_choice = []
        for index in sorted(texts):
            valid, invalid = self.citations(texts[index])
            per_choice.append({"index": index, "citations": [
                {"marker": m, "id": self.hits[m - 1].passage.id, "doc_id": self.hits[m - 1].passage.doc_id}
                for m in valid], "invalid_citations": invalid})
        if per_choice:
            # The first choice's citations at the top level: the common n = 1 case reads them there.
            out["citations"] = per_choice[0]["citations"]
            out["invalid_citations"] = per_choice[0]["invalid_citations"]
            if len(per_choice) > 1:
                out["choices"] = per_choice
        return out
