"""`alignserve index build|ls|search|rm|knn-build`: the on-disk collections (and kNN-LM
datastores) the server serves,
worked offline (no server needed; run them while it is stopped, or on collections it has not
opened, since each process keeps its own open copy).

User errors print one line and exit with status 2.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

index_app = typer.Typer(help="RAG collections on disk (build, list, search, remove).", no_args_is_help=True)

Root = Annotated[Path | None, typer.Option("--index-root", envvar="ALIGNSERVE_INDEX_ROOT",
                                           help="Collections directory (default: the server's default).")]
Name = Annotated[str, typer.Option("--name", help="Collection name.")]


def _retrieval(root: Path | None):
    from retrieval.service import Retrieval, default_root

    return Retrieval(root or default_root())


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2)


@index_app.command("build")
def build(files: Annotated[list[Path], typer.Argument(help=".txt, .md or .jsonl files to add.")],
          name: Name, index_root: Root = None,
          index_type: Annotated[str, typer.Option(help="auto | flat | hnsw | ivf.")] = "auto",
          chunk_words: Annotated[int, typer.Option(help="Words per passage.")] = 100,
          chunk_overlap: Annotated[int, typer.Option(help="Words shared by neighbouring passages.")] = 20) -> None:
    """Create the collection if needed and add the files' documents (a document already
    there, by id, is replaced)."""
    from tqdm import tqdm

    from retrieval.chunking import DocumentError, parse_upload
    from retrieval.service import MAX_DOC_CHARS
    from retrieval.store import StoreError

    retrieval = _retrieval(index_root)
    try:
        docs = []
        for path in files:
            if not path.is_file():
                raise DocumentError(f"{path} is not a file")
            docs += parse_upload(path.name, path.read_bytes(), MAX_DOC_CHARS)
        if name not in retrieval.store.names():
            retrieval.create(name, index_type, chunk_words, chunk_overlap)
        collection = retrieval.store.get(name)
        with tqdm(total=len(collection.chunk(docs)), unit="passage", desc=f"embedding into {name}") as bar:
            result = retrieval.add(name, docs, progress=bar.update)
        ids = result.pop("ids")
        typer.echo(json.dumps({**result, "documents": len(ids), "collection": retrieval.info(name)}))
    except (DocumentError, StoreError) as exc:
        _fail(exc)
    finally:
        retrieval.close()


@index_app.command("ls")
def ls(index_root: Root = None) -> None:
    """One JSON line per collection."""
    retrieval = _retrieval(index_root)
    try:
        for info in retrieval.list():
            typer.echo(json.dumps(info))
    finally:
        retrieval.close()


@index_app.command("search")
def search(query: Annotated[str, typer.Argument(help="What to look for.")], name: Name, index_root: Root = None,
           top_k: Annotated[int, typer.Option(help="Passages to return.")] = 4) -> None:
    """The nearest passages, one JSON line each, best first."""
    from retrieval.store import StoreError

    retrieval = _retrieval(index_root)
    try:
        for hit in retrieval.search(name, query, top_k):
            typer.echo(json.dumps(hit.to_dict()))
    except StoreError as exc:
        _fail(exc)
    finally:
        retrieval.close()


@index_app.command("rm")
def rm(name: Name, index_root: Root = None) -> None:
    """Delete a collection and its files."""
    from retrieval.store import StoreError

    retrieval = _retrieval(index_root)
    try:
        retrieval.delete(name)
        typer.echo(json.dumps({"name": name, "deleted": True}))
    except StoreError as exc:
        _fail(exc)
    finally:
        retrieval.close()


@index_app.command("knn-build")
def knn_build(corpus: Annotated[list[Path], typer.Option("--corpus", help=".txt, .md or .jsonl files (repeatable).")],
              name: Name, index_root: Root = None,
              adapter: Annotated[Path | None, typer.Option(help="PEFT LoRA dir the keys are computed under.")] = None,
              adapter_name: Annotated[str | None, typer.Option(help="Its served name (default: the dir's).")] = None,
              context_window: Annotated[int, typer.Option(min=2, help="Tokens per prefill window.")] = 512,
              model: Annotated[str, typer.Option(help="Base model (as `serve --model`).")] = "SmolLM2-135M-Instruct",
              dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 (as `serve --dtype`).")] = "auto",
              index_type: Annotated[str, typer.Option(help="auto (flat up to 200k keys, IVF-PQ above) | flat | ivfpq.")]
              = "auto",
              ) -> None:
    """A kNN-LM datastore: teacher-forced prefill of the corpus through our engine, keys = the
    last layer's FFN input at every position (fp16), values = the next tokens."""
    from tqdm import tqdm

    from adapters.errors import AdapterError
    from adapters.peft_format import load_peft_adapter
    from retrieval.chunking import DocumentError, parse_upload
    from retrieval.knn_build import build_datastore
    from retrieval.service import MAX_DOC_CHARS, default_root
    from retrieval.store import StoreError
    from server.config import EngineConfig, SchedulerConfig
    from server.engine.engine import LLMEngine

    try:
        texts = []
        for path in corpus:
            if not path.is_file():
                raise DocumentError(f"{path} is not a file")
            texts += [d.text for d in parse_upload(path.name, path.read_bytes(), MAX_DOC_CHARS)]
        engine = LLMEngine(EngineConfig(model=model, dtype=dtype, device="cpu", scheduler=SchedulerConfig(
            max_num_seqs=16, max_num_batched_tokens=4096, max_model_len=max(2048, context_window + 1))))
        served = None
        if adapter is not None:
            served = adapter_name or adapter.resolve().name
            engine.add_adapter(served, load_peft_adapter(adapter, engine.model_config, 64, served))
        total = sum(len(engine.tokenizer.encode(t)) for t in texts)
        root = (index_root or default_root()).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        with tqdm(total=total, unit="tok", desc=f"keys for {name}") as bar:
            store = build_datastore(engine, root, name, texts, served, context_window, progress=bar.update,
                                    index_type=index_type)
        typer.echo(json.dumps(store.info()))
    except (DocumentError, StoreError) as exc:
        _fail(exc)
    except AdapterError as exc:
        _fail(Exception(exc.message))
