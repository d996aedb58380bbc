"""What the vision-language server tests share: a greedy chat through the openai client, and the
check that a repeated image is served from the prefix cache with the same tokens."""

MAX_TOKENS = 6


def chat(client, messages):
    return client.chat.completions.create(model=client.models.list().data[0].id, messages=messages,
                                          max_tokens=MAX_TOKENS, temperature=0, extra_body={"return_token_ids": True})


def check_repeat_hits_prefix_cache(srv, messages: list[dict], expected: list[int]) -> None:
    """The chat twice (block size 4): both give `expected`; the second reused every full block but
    the last token's, the image's placeholders included, and the encoder ran once."""
    client = srv.client()
    before = srv.metrics()
    first = chat(client, messages)
    assert first.choices[0].token_ids == expected
    second = chat(client, messages)
    after = srv.metrics()
    assert second.choices[0].token_ids == expected

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert delta("vllm:prefix_cache_hits_total") == (first.usage.prompt_tokens - 1) // 4 * 4
    assert delta("vllm:mm_cache_queries_total") == 1 and delta("vllm:mm_cache_hits_total") == 0
