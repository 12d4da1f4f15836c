"""`python -m bench.rag_pipeline` (`make bench-rag`): the whole RAG quality run, start to end.

1. Write the invented evaluation set and a disjoint reader-training set (bench.rag_facts).
2. Reader adapter, after RA-DIT: index the *training* set's passages offline
   (`alignserve index build`), turn its questions into (question + retrieved passages ->
   answer [i]) chat examples (`alignserve data rag-reader`), and `alignserve train sft` a LoRA.
3. Serve the base model with that adapter and run bench.rag_quality (closed book; generate and
   extractive at each k; the reader adapter) on the evaluation set.

Every command it runs is printed and saved with the results. Work files (indexes, adapter,
SFT data) go under --work (not committed); the results go to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def sh(cmd: list[str], log: list[str], **kwargs) -> subprocess.CompletedProcess:
    line = " ".join(shlex.quote(str(c)) for c in cmd)
    print(f"+ {line}", flush=True)
    log.append(line)
    return subprocess.run([str(c) for c in cmd], check=True, cwd=REPO, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "alignserve-rag-bench")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "rag_quality.json")
    p.add_argument("--num-questions", type=int, default=300)
    p.add_argument("--train-size", type=int, default=400)
    p.add_argument("--train-top-k", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--ks", default="1,3,5")
    p.add_argument("--skip-train", action="store_true", help="Reuse the adapter already in --work.")
    p.add_argument("--dtype", default="auto")
    args = p.parse_args(argv)
    work, log = args.work, []
    data, indexes, adapter = work / "data", work / "indexes", work / "rag-reader"
    work.mkdir(parents=True, exist_ok=True)
    sh([sys.executable, "-m", "bench.rag_quality", "--dump-questions", data, "--train-size", args.train_size], log)
    if not args.skip_train:
        subprocess.run([BIN / "alignserve", "index", "rm", "--name", "rag-train", "--index-root", indexes],
                       cwd=REPO, capture_output=True)
        sh([BIN / "alignserve", "index", "build", data / "train_s1_documents.jsonl", "--name", "rag-train",
            "--index-root", indexes], log)
        sh([BIN / "alignserve", "data", "rag-reader", "--index", "rag-train", "--questions",
            data / "train_s1_questions.jsonl", "--output", work / "reader_sft.jsonl", "--index-root", indexes,
            "--top-k", args.train_top_k], log)
        sh([BIN / "alignserve", "train", "sft", "--data", work / "reader_sft.jsonl", "--output", adapter,
            "--max-steps", args.max_steps, "--batch-size", args.batch_size, "--lora-r", args.lora_r,
            "--lora-alpha", 2 * args.lora_r, "--max-length", 512, "--overwrite"], log)
    port = free_port()
    serve = [BIN / "alignserve", "serve", "--host", "127.0.0.1", "--port", port, "--dtype", args.dtype,
             "--index-root", indexes, "--lora-modules", f"rag-reader={adapter}", "--log-level", "warning"]
    log.append(" ".join(shlex.quote(str(c)) for c in serve))
    server = subprocess.Popen([str(c) for c in serve], cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(1)
        sh([sys.executable, "-m", "bench.rag_quality", "--base-url", f"http://127.0.0.1:{port}/v1",
            "--out", args.out, "--num-questions", args.num_questions, "--ks", args.ks,
            "--reader-adapter", "rag-reader"], log)
    finally:
        server.terminate()
        server.wait(timeout=60)
    doc = json.loads(args.out.read_text())
    doc["pipeline"] = {"commands": log, "train_size": args.train_size, "train_top_k": args.train_top_k,
                       "max_steps": args.max_steps, "batch_size": args.batch_size, "lora_r": args.lora_r,
                       "invocation": " ".join([sys.executable, "-m", "bench.rag_pipeline",
                                               *(argv if argv is not None else sys.argv[1:])])}
    train_summary = adapter / "alignserve.json"
    if train_summary.exists():
        doc["pipeline"]["adapter_card"] = json.loads(train_summary.read_text())
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
