"""Chat about images over the OpenAI API: a tiny image-to-text model served (`sparkgpt.serve.images`) answers
image_url content parts as `LM.chat` does, refuses bad images with a 400 naming their part, and a text model refuses
images by name. The app runs in this process (Starlette's TestClient is an httpx client the openai client drives)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from starlette.testclient import TestClient
from test_image_text import tiny_lm as tiny_image_lm
from test_serve import API_KEY, one_torch_thread, tiny_lm  # noqa: F401 (a fixture)
from test_serve import MODEL as TEXT_MODEL
from test_serve_rag import openai_client, serving
from test_serve_web import page, web_server  # noqa: F401 (fixtures: a text model's server and its page)

from sparkgpt import LM, Tokenizer
from sparkgpt.data.images import MAX_IMAGE_BYTES
from sparkgpt.serve.engine import Engine
from sparkgpt.serve.server import start_serving

openai = pytest.importorskip("openai")

MODEL = "tiny-vision"


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def asking(url: str) -> list[dict]:
    """One user turn: the question first, the image second (so its part is messages[0].content[1])."""
    return [{"role": "user", "content": [{"type": "text", "text": "what color is the shape?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


RED = asking(data_url(Image.new("RGB", (20, 20), (220, 30, 30))))


@pytest.fixture(scope="module")
def image_lm() -> LM:
    return tiny_image_lm()


@pytest.fixture(scope="module")
def image_client(image_lm: LM) -> Iterator[TestClient]:
    # Room for an image over the 20 MB limit, so the image check (not the body limit) refuses it.
    with serving(MODEL, lambda: start_serving(image_lm), max_body_bytes=32 << 20) as client:
        yield client


def test_an_image_chat_whole_and_streamed_equals_lm_chat_with_usage_and_finish_reason(image_lm: LM,
                                                                                       image_client: TestClient):
    expected = image_lm.chat(RED, temperature=0, max_new_tokens=8)
    prompt_tokens = len(image_lm.chat_inputs(RED)[0])
    api = openai_client(image_client)
    reply = api.chat.completions.create(model=MODEL, messages=RED, temperature=0, max_tokens=8)
    choice = reply.choices[0]
    assert choice.message.content == expected and choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == prompt_tokens and reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens

    chunks = list(api.chat.completions.create(model=MODEL, messages=RED, temperature=0, max_tokens=8, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == reply.usage


def test_sampling_fields_apply_to_an_image_chat(image_lm: LM, image_client: TestClient):
    sampling = dict(temperature=1.5, top_p=0.9, seed=7, stop=["e"])
    expected = image_lm.chat(RED, max_new_tokens=6, **sampling)
    reply = openai_client(image_client).chat.completions.create(model=MODEL, messages=RED, max_tokens=6, **sampling)
    assert reply.choices[0].message.content == expected and "e" not in expected


BAD_IMAGES = {
    "corrupt base64": ("data:image/png;base64,@@not base64@@", "not valid base64"),
    "not an image": ("data:image/png;base64," + base64.b64encode(b"just some text").decode(), "not a readable image"),
    "an http URL": ("http://example.com/cat.png", "never fetched"),
    "over the limit": ("data:image/png;base64," + "A" * ((MAX_IMAGE_BYTES + 2) // 3 * 4 + 8), "over the limit"),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_a_bad_image_is_a_400_naming_its_part_and_the_next_request_succeeds(image_client: TestClient, case: str,
                                                                            stream: bool):
    url, message = BAD_IMAGES[case]
    api = openai_client(image_client)
    with pytest.raises(openai.BadRequestError) as raised:
        api.chat.completions.create(model=MODEL, messages=asking(url), max_tokens=2, stream=stream)
    error = raised.value.body
    assert raised.value.status_code == 400 and error["param"] == "messages[0].content[1]", error
    assert message in error["message"]
    assert api.chat.completions.create(model=MODEL, messages=RED, max_tokens=2).choices[0].message.content is not None


def test_an_image_chat_without_an_image_is_a_400_naming_messages(image_client: TestClient):
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client(image_client).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert raised.value.body["param"] == "messages" and "image_url" in raised.value.body["message"]


def test_an_image_model_refuses_completions_embeddings_and_tools_by_name(image_client: TestClient):
    api = openai_client(image_client)
    assert image_client.get("/health").json() == {"status": "ok", "model": MODEL}
    assert [m.id for m in api.models.list().data] == [MODEL]
    for call, code in ((lambda: api.completions.create(model=MODEL, prompt="hi"), "model_cannot_generate"),
                       (lambda: api.embeddings.create(model=MODEL, input="hi"), "model_cannot_embed")):
        with pytest.raises(openai.BadRequestError) as raised:
            call()
        assert raised.value.body["param"] == "model" and raised.value.body["code"] == code
    tool = {"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as raised:
        api.chat.completions.create(model=MODEL, messages=RED, tools=[tool])
    assert raised.value.body["param"] == "tools"


def test_a_text_model_answers_an_image_part_with_a_400_naming_it(tokenizer: Tokenizer):
    with serving("tiny-chat", lambda: Engine(tiny_lm(tokenizer, max_seq_len=64), max_slots=1).start()) as client:
        api = openai_client(client)
        image_first = [{"role": "user", "content": [*reversed(RED[0]["content"])]}]
        with pytest.raises(openai.BadRequestError) as raised:
            api.chat.completions.create(model="tiny-chat", messages=image_first, max_tokens=2)
        error = raised.value.body
        assert error["param"] == "messages[0].content[0]" and "does not read images" in error["message"]
        parts = [{"type": "text", "text": "To be, "}, {"type": "text", "text": "or"}]
        text_parts = [{"role": "user", "content": parts}]
        assert api.chat.completions.create(model="tiny-chat", messages=text_parts, max_tokens=2).choices


def test_the_chat_page_shows_an_attached_image_and_a_text_models_400(page, web_server, tmp_path: Path):  # noqa: F811
    page.evaluate(f"localStorage.setItem('sparkgpt.apiKey', {API_KEY!r})")
    page.reload()
    page.wait_for_function(f"document.getElementById('model-name').textContent === {TEXT_MODEL!r}")
    path = tmp_path / "red.png"
    Image.new("RGB", (20, 20), (220, 30, 30)).save(path)
    page.set_input_files("#attach", str(path))
    page.locator("#attachment").wait_for(state="visible")
    page.fill("#input", "what color is it?")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelector('.message.assistant:last-child').dataset.state === 'error'")
    thumbnail = page.locator(".message.user").last.locator("img.thumbnail")
    assert thumbnail.get_attribute("src").startswith("data:image/png;base64,")
    assert "does not read images" in page.locator(".message.assistant").last.text_content()
    assert page.locator("#attachment").is_hidden()  # the image went with that message only


def test_an_image_chat_fills_the_context_without_max_tokens_and_refuses_past_it(image_lm: LM,
                                                                                image_client: TestClient):
    """Without max_tokens the reply may run to the decoder's last position (its start token takes one); more than
    the context is a 400 naming the messages, never a 500."""
    api = openai_client(image_client)
    assert api.chat.completions.create(model=MODEL, messages=RED, temperature=0).choices[0].finish_reason
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=MODEL, messages=RED, max_tokens=image_lm.config.max_seq_len)
    assert caught.value.body["code"] == "context_length_exceeded"


def test_clients_no_op_defaults_are_not_refused(image_client: TestClient):
    """tools: [], tool_choice "none", parallel_tool_calls and a text response_format ask for nothing."""
    reply = image_client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": RED, "max_tokens": 2, "tools": [], "tool_choice": "none",
        "parallel_tool_calls": True, "response_format": {"type": "text"}, "logprobs": False})
    assert reply.status_code == 200, reply.text
