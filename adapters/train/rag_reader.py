"""Reader-adapter data, after RA-DIT (Lin et al. 2023): (question + retrieved passages ->
answer) chat examples from a user's own collection, rendered exactly as the server's `rag`
option renders a request, so an SFT adapter learns to read the prompts it will be served.

Each question row is `{"question", "answer"}`; the answer is followed by the marker of the
first retrieved passage that contains it (the model learns to cite), or stands alone when
retrieval missed (it learns to answer from what it has, as RA-DIT trains on top-k as
retrieved, not on gold passages).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters.train.data import DataError, read_jsonl


def build_reader_examples(retrieval, index: str, questions: Path, top_k: int = 3,
                          cite: bool = True) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(SFT rows `{"messages": [...]}`, counts). `retrieval` is a retrieval.service.Retrieval."""
    from server.methods.rag import RAG, RAGOptions

    options = RAGOptions(index=index, top_k=top_k, cite=cite)
    rows, errors = [], []
    hits = 0
    for number, row in read_jsonl(questions):
        question, answer = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not question.strip() or not isinstance(answer, str) or not answer.strip():
            errors.append(f"line {number}: needs non-empty string fields 'question' and 'answer'")
            continue
        rag = RAG(options, retrieval)
        rag.retrieve(question)
        marker = next((i for i, h in enumerate(rag.hits, 1) if answer.lower() in h.passage.text.lower()), None)
        hits += marker is not None
        reply = f"{answer} [{marker}]" if cite and marker is not None else answer
        messages = rag.rewrite_chat([{"role": "user", "content": question}])
        rows.append({"messages": messages + [{"role": "assistant", "content": reply}]})
    if errors:
        raise DataError(f"{questions}: " + "; ".join(errors[:10]))
    return rows, {"examples": len(rows), "answer_retrieved": hits}
