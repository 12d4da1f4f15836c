"""Screenshots of each playground view, for docs/playground/ and the README.

    .venv/bin/python -m bench.playground_screenshots [--out docs/playground]

Starts a real server on the default model (a random reward adapter `rm` and a random LoRA
`arm` as GenARM's guide, a RAG collection of three short documents, a kNN-LM datastore of a
short invented text), drives the page with
Playwright on Debian's Chromium as tests/e2e/test_playground.py does, and writes one PNG per
view. The adapters are random, so rewards and texts are illustrations, not results.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from tests.adapters.real_lora import ATTENTION, make_real_adapter
from tests.conftest import REPO, ServerProcess
from tests.e2e.browser import connect, launch, send
from tests.methods.adapters import make_reward_adapter

KEY = "screenshot-key"
CORPUS = ("The river Velmor flows through Tarsk and Quill. Tarsk is known for blue glass and Quill for stone "
          "bridges. The mayor of Tarsk is Oren Vale, who founded the glass guild in 1871.\n")
DOCS = [
    {"title": "Cats", "text": "Cats sleep for about sixteen hours a day. Popular names for cats are Luna and Milo."},
    {"title": "Dogs", "text": "Dogs were domesticated from wolves. Popular names for dogs are Max and Bella."},
    {"title": "Parrots", "text": "Parrots can live for more than fifty years and some learn hundreds of words."},
]


def method(page, name: str, **fields: str) -> None:
    """Switch one method on (alone) and fill its option fields by label."""
    page.click("#clear")  # one turn per view: earlier replies would leak into the prompt
    for box in page.locator("#methods input[type=checkbox]:checked").all():
        box.uncheck()
    page.check(f"#use-{name}")
    panel = page.locator(f"fieldset[data-method={name}]")
    for label, value in fields.items():
        control = panel.get_by_label(label.replace("_", " "), exact=True)
        if control.evaluate("e => e.tagName") == "SELECT":
            control.select_option(value)
        else:
            control.fill(value)


def shoot(page, out: Path, name: str, reply=None) -> None:
    page.locator("#tip").evaluate("e => e.hidden = true")
    target = reply if reply is not None else page
    target.screenshot(path=str(out / f"{name}.png"), **({} if reply is not None else {"full_page": True}))
    print("wrote", out / f"{name}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "playground")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (REPO / ".pytest_cache").mkdir(exist_ok=True)
    from playwright.sync_api import sync_playwright
    from server.models.default_model import ensure_default_model

    model_dir = ensure_default_model()
    root = Path(tempfile.mkdtemp(prefix="playground-shots-"))
    make_reward_adapter(model_dir, root / "rm", seed=5)
    make_real_adapter(model_dir, root / "arm", ATTENTION, 8, seed=11, std=0.1)
    make_real_adapter(model_dir, root / "beta", ATTENTION, 8, seed=2)
    # A small kNN-LM datastore, built offline as `alignserve index knn-build` does.
    index_root = root / "indexes"
    (root / "corpus.txt").write_text(CORPUS * 3)
    subprocess.run([sys.executable, "-m", "server.cli", "index", "knn-build", "--corpus", str(root / "corpus.txt"),
                    "--name", "velmor", "--index-root", str(index_root), "--context-window", "64",
                    "--dtype", "float32"], cwd=REPO, check=True, capture_output=True)
    srv = ServerProcess("--adapter-root", str(root), "--lora-modules", f"rm={root / 'rm'}",
                        "--lora-modules", f"arm={root / 'arm'}", "--num-kv-blocks", "512",
                        "--max-model-len", "1024", "--index-root", str(index_root), api_key=KEY)
    try:
        http = httpx.Client(base_url=srv.base_url, headers=srv.headers(), timeout=120)
        http.post("/v1/indexes", json={"name": "animals"}).raise_for_status()
        http.post("/v1/indexes/animals/documents", json={"documents": DOCS}).raise_for_status()
        with sync_playwright() as p:
            browser = launch(p)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(120_000)
            connect(page, srv.base_url, KEY)
            page.locator("#sampling").get_by_label("Seed").fill("3")
            page.locator("#sampling").get_by_label("Max tokens").fill("24")
            reply = send(page, "Suggest a name for a pet cat.")
            reply.locator(".tok").nth(3).hover()
            page.screenshot(path=str(args.out / "overview.png"))
            print("wrote", args.out / "overview.png")
            method(page, "best_of_n", Best_of="4", Reward_model="rm")
            shoot(page, args.out, "best_of_n", send(page, "Suggest a name for a pet dog."))
            method(page, "dola", Dola_layers="0, 8, 16, 24")
            shoot(page, args.out, "dola", send(page, "Name three colours."))
            method(page, "genarm", Reward_model="arm")
            shoot(page, args.out, "genarm", send(page, "Describe the sea in one sentence."))
            method(page, "search", Reward_model="rm", Beam_width="3", Block_tokens="6", Max_blocks="3")
            shoot(page, args.out, "block_search", send(page, "Give me a tip for sleeping well."))
            method(page, "rain", Max_iterations="3", Token_set_size="3")
            page.locator("#sampling").get_by_label("Max tokens").fill("8")
            shoot(page, args.out, "rain", send(page, "How do I calm down?"))
            method(page, "rag", Index="animals", Top_k="2")
            page.locator("#sampling").get_by_label("Max tokens").fill("32")
            shoot(page, args.out, "rag", send(page, "What are popular names for cats? Cite the passage."))
            method(page, "knn_lm", Datastore="velmor", Lambda="0.5")
            shoot(page, args.out, "knn_lm", send(page, "Which river flows through Tarsk?"))
            page.locator("#methods input[type=checkbox]:checked").first.uncheck()
            page.click("#adapters-details summary")
            panel = page.locator("#adapters-panel")
            panel.get_by_label("Adapter name").fill("beta")
            panel.get_by_label("Path (inside --adapter-root)").fill("beta")
            panel.get_by_role("button", name="Load adapter").click()
            panel.locator("li[data-adapter=beta]").wait_for()
            panel.get_by_label("Adapter name").fill("bad")
            panel.get_by_label("Path (inside --adapter-root)").fill("../outside")
            panel.get_by_role("button", name="Load adapter").click()
            panel.locator(".result.error").wait_for()
            page.click("#rag-details summary")
            page.click("#sampling-details summary")  # folded: the panels are what this view shows
            page.locator(".side").screenshot(path=str(args.out / "panels.png"))
            print("wrote", args.out / "panels.png")
            mobile = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
            mobile.set_default_timeout(120_000)
            connect(mobile, srv.base_url, KEY)
            mobile.click("#sampling-details summary")
            mobile.locator("#sampling").get_by_label("Max tokens").fill("16")
            mobile.click("#sampling-details summary")
            send(mobile, "Hello!").scroll_into_view_if_needed()
            mobile.locator("#tip").evaluate("e => e.hidden = true")
            mobile.screenshot(path=str(args.out / "mobile.png"))
            print("wrote", args.out / "mobile.png")
            browser.close()
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
