"""Drive a running Cresset server with the official `openai` client, unchanged: list models,
a chat completion, the same streamed (server-sent events), and a streamed text completion
with usage. Exits non-zero with a message when anything is off.

Usage: python tests/openai_client.py BASE_URL MODEL   (BASE_URL like http://127.0.0.1:PORT/v1)
"""

import sys

import openai


def main(base_url: str, model: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    ids = [m.id for m in client.models.list()]
    assert model in ids, ids

    question = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model=model, messages=question, temperature=0, max_tokens=24)
    answer = whole.choices[0].message.content
    assert "Paris" in answer, answer
    assert whole.choices[0].finish_reason == "stop", whole.choices[0].finish_reason
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0, whole.usage

    stream = client.chat.completions.create(
        model=model, messages=question, temperature=0, max_tokens=24, stream=True
    )
    pieces, finish, chunks = [], None, 0
    for chunk in stream:
        chunks += 1
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    streamed = "".join(pieces)
    assert streamed == answer, (streamed, answer)
    assert chunks > 3 and finish == "stop", (chunks, finish)

    completion = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=6, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    usage = None
    text = ""
    for chunk in completion:
        if chunk.choices:
            text += chunk.choices[0].text
        if chunk.usage:
            usage = chunk.usage
    assert usage is not None and usage.completion_tokens == 6, usage
    assert text, "a streamed completion has text"

    try:
        client.chat.completions.create(model="no-such-model", messages=question)
        raise AssertionError("an unknown model must fail")
    except openai.NotFoundError:
        pass
    try:
        client.chat.completions.create(model=model, messages=question, max_tokens=-1)
        raise AssertionError("a negative max_tokens must fail")
    except openai.BadRequestError as e:
        assert "max_tokens" in str(e), e
    print(f"ok: {answer!r}; {chunks} chunks")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
