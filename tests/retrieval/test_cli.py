"""`alignserve index build | ls | search | rm` and `alignserve data rag-reader`, run as the
commands a user types, on one on-disk root (the real embedder, no server)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_index_commands_and_reader_data(tmp_path):
    root = str(tmp_path / "indexes")
    (tmp_path / "a.md").write_text("# Harbour\nThe harbour master of Velt is Oda Pran.")
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": "mill", "title": "Mill", "text": "The mill grinds rye."})
                                      + "\n")
    built = json.loads(cli("index", "build", str(tmp_path / "a.md"), str(tmp_path / "b.jsonl"), "--name", "docs",
                           "--index-root", root).stdout.strip().splitlines()[-1])
    assert built["added_passages"] == 2 and built["collection"]["num_documents"] == 2
    listed = [json.loads(line) for line in cli("index", "ls", "--index-root", root).stdout.splitlines()]
    assert [c["name"] for c in listed] == ["docs"]
    hits = [json.loads(line) for line in cli("index", "search", "who is the harbour master?", "--name", "docs",
                                             "--index-root", root, "--top-k", "2").stdout.splitlines()]
    assert [h["doc_id"] for h in hits] == ["a", "mill"] and hits[0]["score"] > hits[1]["score"]

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "Who is the harbour master of Velt?", "answer": "Oda Pran"}) + "\n")
    out = tmp_path / "sft.jsonl"
    summary = json.loads(cli("data", "rag-reader", "--index", "docs", "--questions", str(questions), "--output",
                             str(out), "--index-root", root, "--top-k", "2").stdout.strip().splitlines()[-1])
    assert summary == {"output": str(out), "examples": 1, "answer_retrieved": 1}
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    user, reply = row["messages"]
    # The same prompt the server's `rag` option builds, and the answer citing its passage.
    assert user["role"] == "user" and "[1] Harbour:" in user["content"] and "[2] Mill:" in user["content"]
    assert user["content"].endswith("Question: Who is the harbour master of Velt?")
    assert reply == {"role": "assistant", "content": "Oda Pran [1]"}

    bad = cli("index", "search", "x", "--name", "nope", "--index-root", root, check=False)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    assert json.loads(cli("index", "rm", "--name", "docs", "--index-root", root).stdout)["deleted"] is True
    assert cli("index", "ls", "--index-root", root).stdout == ""
