"""The web playground in a real browser (Playwright + Debian's Chromium) against a real server:
streaming chat, best-of-N with a reward adapter and DoLa drawn from the response, adapter
load / unload and a server error shown, capabilities derived from the request model, the
axe-core scan and a 390-px viewport."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.adapters.real_lora import ATTENTION, make_real_adapter
from tests.conftest import ServerProcess
from tests.e2e.browser import axe_violations, connect, horizontal_overflow, launch, send
from tests.methods.adapters import make_reward_adapter

pytestmark = pytest.mark.e2e
KEY = "pg-key"


@pytest.fixture(scope="module")
def pg_server(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("playground-adapters")
    make_reward_adapter(model_dir, root / "rm", seed=5)
    make_real_adapter(model_dir, root / "beta", ATTENTION, 8, seed=2)
    srv = ServerProcess("--adapter-root", str(root), "--lora-modules", f"rm={root / 'rm'}",
                        "--lora-modules", f"guide={root / 'beta'}",
                        "--num-kv-blocks", "512", "--max-model-len", "1024", api_key=KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch(p)  # fails, with the fix in its message, if Chromium is not installed
        yield b
        b.close()


@pytest.fixture()
def page(browser, pg_server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    connect(pg, pg_server.base_url, KEY)
    yield pg
    context.close()
    assert not errors, errors


def test_page_and_capabilities_need_no_secret_in_the_page(pg_server):
    # The page itself is public (it must load to ask for the key); the API is not.
    assert httpx.get(pg_server.base_url + "/playground").status_code == 200
    assert 'href="/playground"' in httpx.get(pg_server.base_url + "/").text
    assert httpx.get(pg_server.base_url + "/v1/capabilities").status_code == 401
    caps = httpx.get(pg_server.base_url + "/v1/capabilities", headers=pg_server.headers()).json()
    # Derived from the request model's validators, not a fixed list.
    assert set(caps["methods"]) == {"best_of_n", "dola", "genarm", "search", "rain", "rag", "knn_lm"}
    assert caps["methods"]["best_of_n"]["streamable"] is False
    assert caps["methods"]["rain"]["logprobs"] is False
    assert ["best_of_n", "dola"] in caps["conflicts"] and not any("rag" in pair for pair in caps["conflicts"])
    assert caps["methods"]["dola"]["fields"]["dola_relative_top"]["default"] == 0.1
    assert caps["features"] == {"adapter_loading": True, "retrieval": True, "metrics": True}


def test_capabilities_follow_the_server():
    from server.api.routes_playground import capabilities

    caps = capabilities("m", adapter_loading=False, retrieval=False)
    assert "rag" not in caps["methods"] and "knn_lm" not in caps["methods"]
    assert caps["features"]["adapter_loading"] is False
    assert caps["methods"]["best_of_n"]["switch"] == {"best_of": 2}


def test_api_key_stays_in_the_tab(browser, pg_server):
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(pg_server.base_url + "/playground")
        page.wait_for_selector("#conn:has-text('needs an API key')")
        page.fill("#api-key", "wrong")
        page.click("#key-form button[type=submit]")
        page.wait_for_selector("#conn:has-text('refused')")
        page.fill("#api-key", KEY)
        page.click("#key-form button[type=submit]")
        page.wait_for_selector("body[data-connected=true]")
        stored = page.evaluate("() => [sessionStorage.length, localStorage.length, document.cookie]")
        assert stored == [1, 0, ""]
        page.reload()  # the same tab keeps it; a new tab (context) would not
        page.wait_for_selector("body[data-connected=true]")
    finally:
        context.close()


def test_stream_best_of_n_and_dola(page):
    # The stream arrives piece by piece: watch the reply grow before it is done.
    page.evaluate("""() => { window.__seen = [];
        new MutationObserver(() => { const m = document.querySelector('li.msg.assistant');
          if (m) window.__seen.push([m.querySelectorAll('.tok').length, m.dataset.done === 'true']); })
        .observe(document.getElementById('log'), {subtree: true, childList: true, attributes: true}); }""")
    reply = send(page, "Suggest a name for a pet cat.")
    assert reply.get_attribute("data-error") is None
    seen = page.evaluate("window.__seen")
    partial = sorted({n for n, done in seen if not done and n > 0})
    assert len(partial) >= 2, seen  # at least two sizes of the reply seen while streaming
    assert int(reply.get_attribute("data-chunks")) >= 2
    assert reply.locator(".tok[tabindex='0']").count() >= 2  # tokens carry logprobs
    # Hovering a token shows its logprob and the top alternatives.
    reply.locator(".tok").first.hover()
    assert page.locator("#tip").is_visible()
    assert "logprob" in page.inner_text("#tip") and page.locator("#tip tr").count() >= 2

    # Best-of-N scored by the reward adapter: not streamable, so sent as one JSON response.
    page.check("#use-best_of_n")
    box = page.locator("fieldset[data-method=best_of_n]")
    box.get_by_label("Best of").fill("3")
    box.get_by_label("Reward model").select_option("rm")
    page.locator("#sampling").get_by_label("Seed").fill("7")
    with page.expect_response("**/v1/chat/completions") as resp:
        reply = send(page, "Suggest a name for a pet dog.")
    report = resp.value.json()["alignment"]["best_of_n"]
    assert report["scorer"] == "rm" and report["n"] == 3
    cands = reply.locator("[data-testid=candidate]")
    assert cands.count() == 3
    shown = [float(cands.nth(i).locator("[data-testid=reward]").inner_text()) for i in range(3)]
    assert all(abs(a - c["reward"]) <= 6e-4 for a, c in zip(shown, report["candidates"])), (shown, report)
    chosen = [i for i in range(3) if cands.nth(i).get_attribute("data-chosen") == "true"]
    assert chosen == report["chosen"]
    assert cands.nth(chosen[0]).locator(".badge").inner_text() == "chosen"
    widths = [cands.nth(i).locator(".fill").evaluate("e => e.getBoundingClientRect().width") for i in range(3)]
    assert widths.index(max(widths)) == chosen[0]  # the longest reward bar is the chosen one
    assert [cands.nth(i).locator(".cand-text").inner_text() for i in range(3)] == \
        [c["text"] for c in report["candidates"]]

    # DoLa: switching it on turns best-of-N off (the server reports the conflict).
    page.check("#use-dola")
    assert not page.is_checked("#use-best_of_n")
    assert "Best-of-N turned off" in page.inner_text("#notes")
    page.locator("fieldset[data-method=dola]").get_by_label("Dola layers").fill("0, 10, 20")
    reply = send(page, "Name a colour.")
    assert reply.get_attribute("data-error") is None
    alignment = json.loads(reply.locator(".raw pre").text_content())
    layers = alignment["dola"]["premature_layers"][0]
    assert layers and set(layers) <= {0, 10, 20}
    tinted = reply.locator(".tok.dola")
    assert tinted.count() == len(layers)
    assert [int(tinted.nth(i).get_attribute("data-layer")) for i in range(len(layers))] == layers
    # Each layer has its own tint, as the legend shows.
    colours = {}
    for i, layer in enumerate(layers):
        colours.setdefault(layer, set()).add(tinted.nth(i).evaluate("e => getComputedStyle(e).backgroundColor"))
    assert all(len(c) == 1 for c in colours.values())
    assert len({next(iter(c)) for c in colours.values()}) == len(colours)
    assert reply.locator("[data-testid=dola-legend] li").count() == 3

    violations = axe_violations(page)
    assert not violations, json.dumps(violations, indent=1)


def test_adapter_panel_load_unload_and_errors(page, pg_server):
    page.click("#adapters-details summary")
    panel = page.locator("#adapters-panel")
    panel.get_by_label("Adapter name").fill("beta")
    panel.get_by_label("Path (inside --adapter-root)").fill("beta")
    panel.get_by_role("button", name="Load adapter").click()
    panel.locator("li[data-adapter=beta]").wait_for()
    assert "Loaded beta" in panel.locator(".result").inner_text()
    assert page.locator("#model option[value=beta]").count() == 1
    assert "beta" in httpx.get(pg_server.base_url + "/v1/models", headers=pg_server.headers()).text
    panel.get_by_role("button", name="Unload beta").click()
    panel.locator("li[data-adapter=beta]").wait_for(state="detached")
    assert page.locator("#model option[value=beta]").count() == 0

    # A bad path: the server's own message reaches the user, in the panel and as an alert.
    expected = httpx.post(pg_server.base_url + "/v1/load_lora_adapter", headers=pg_server.headers(),
                          json={"lora_name": "bad", "lora_path": "no/such/dir"})
    assert expected.status_code >= 400
    panel.get_by_label("Adapter name").fill("bad")
    panel.get_by_label("Path (inside --adapter-root)").fill("no/such/dir")
    panel.get_by_role("button", name="Load adapter").click()
    error = panel.locator(".result.error")
    error.wait_for()
    assert expected.json()["error"]["message"] in error.inner_text()
    assert str(expected.status_code) in error.inner_text()
    assert expected.json()["error"]["message"] in page.locator("#alerts").inner_text()
    # A chat the server refuses (unknown reward model) is shown too, not swallowed.
    page.check("#use-genarm")
    reply = send(page, "Hello")
    assert "genarm" in reply.get_attribute("data-error")
    assert "error" in reply.locator(".status").inner_text()


def test_genarm_rag_panel_and_metrics(page):
    # GenARM: tokens whose guided pick is not the base model's top token are marked.
    page.check("#use-genarm")
    page.locator("fieldset[data-method=genarm]").get_by_label("Reward model").select_option("guide")
    page.locator("fieldset[data-method=genarm]").get_by_label("Alpha").fill("4")
    reply = send(page, "Describe the sea.")
    report = json.loads(reply.locator(".raw pre").text_content())["genarm"]
    tops = report["base_top"][0]
    assert len(tops) == reply.locator(".tok").count() == report["guided_tokens"]
    differs = [i for i, t in enumerate(tops) if t["differs"]]
    assert differs, tops  # alpha 4 with a random guide changes some picks
    marked = reply.locator(".tok.guided")
    assert [int(marked.nth(k).get_attribute("data-i")) for k in range(marked.count())] == differs
    marked.first.hover()
    assert f"base top was {json.dumps(tops[differs[0]]['token'])}" in page.inner_text("#tip")
    page.uncheck("#use-genarm")

    # RAG panel: create a collection, add a document, chat over it; passages are listed.
    page.click("#rag-details summary")
    panel = page.locator("#rag-panel")
    panel.get_by_label("New collection name").fill("pets")
    panel.get_by_role("button", name="Create collection").click()
    panel.locator("li[data-index=pets]").wait_for()
    panel.get_by_label("Or paste: title").fill("Cats")
    panel.get_by_label("Text", exact=True).fill("Luna and Milo are popular names for cats.")
    panel.get_by_role("button", name="Add documents").click()
    panel.locator("li[data-index=pets]:has-text('1 docs')").wait_for()
    panel.get_by_role("button", name="Create collection").click()  # again: the server's 409 is shown
    panel.locator(".result.error:has-text('409')").wait_for()
    page.check("#use-rag")
    page.locator("fieldset[data-method=rag]").get_by_label("Index").select_option("pets")
    reply = send(page, "Name a cat. Cite the passage.")
    passage = reply.locator("[data-testid=passage]")
    assert passage.count() == 1 and "Cats" in passage.inner_text()
    passage.locator(".cand-text:has-text('Luna')").wait_for()  # its text, fetched by the page

    # The metrics strip polls /metrics: requests counted, KV shown as a percentage.
    page.wait_for_function("Number(document.getElementById('metrics').dataset.polled) >= 2")
    strip = page.locator("#metrics")
    assert int(strip.locator("[data-metric=requests]").inner_text()) >= 2
    assert strip.locator("[data-metric=KV]").inner_text().endswith("%")
    assert strip.get_attribute("data-error") is None


def test_narrow_viewport_is_usable(browser, pg_server):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        connect(page, pg_server.base_url, KEY)
        assert horizontal_overflow(page) <= 0
        page.locator("#use-dola").scroll_into_view_if_needed()
        page.check("#use-dola")  # a control low in the settings column is reachable
        page.uncheck("#use-dola")
        assert not page.locator("#sampling-details").evaluate("e => e.open")  # folded: the chat comes first
        page.click("#sampling-details summary")
        page.locator("#sampling").get_by_label("Max tokens").fill("8")
        reply = send(page, "Hi there")
        assert reply.get_attribute("data-done") == "true"
        for sel in ("#send", "#prompt", "#model", "#api-key"):
            box = page.locator(sel).bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= 390, (sel, box)
        assert horizontal_overflow(page) <= 0
        violations = axe_violations(page)
        assert not violations, json.dumps(violations, indent=1)
    finally:
        context.close()
