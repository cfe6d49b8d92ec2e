"""Streamed detokenization with stop strings, and the sampler."""

from __future__ import annotations

import torch
from tiny_llama import tiny_tokenizer

from memosd.runtime.decode import Sampler, TextStream


class CharTokenizer:
    """One token per character (ids are code points), so the tests control the text exactly."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def stream(text: str, stops: list[str]) -> tuple[list[str], TextStream]:
    s = TextStream(CharTokenizer(), stops)
    deltas = []
    for ch in text:
        deltas.append(s.push(ord(ch)))
        if s.stopped:
            break
    if not s.stopped:
        deltas.append(s.flush())
    return deltas, s


def test_without_stops_every_character_streams_at_once() -> None:
    deltas, s = stream("hello", [])
    assert deltas == ["h", "e", "l", "l", "o", ""] and s.text == "hello"


def test_a_stop_string_is_never_streamed() -> None:
    deltas, s = stream("abc</s>def", ["</s>"])
    assert "".join(deltas) == "abc" and s.stopped and s.text == "abc"
    # "<", "</", "</s" were held back while they could still become the stop string.
    assert deltas == ["a", "b", "c", "", "", "", ""]


def test_a_false_start_is_released_once_it_cannot_be_a_stop() -> None:
    deltas, s = stream("a</x", ["</s>"])
    assert deltas == ["a", "", "", "</x", ""] and not s.stopped


def test_the_earliest_of_several_stops_wins() -> None:
    deltas, s = stream("one. two! three", ["!", "."])
    assert "".join(deltas) == "one" and s.stopped


def test_half_a_character_waits_for_the_rest() -> None:
    tok = tiny_tokenizer()
    ids = tok("café ☕", add_special_tokens=False)["input_ids"]
    s = TextStream(tok, [])
    out = "".join(s.push(i) for i in ids) + s.flush()
    assert out == "café ☕" and "\ufffd" not in out


def test_greedy_takes_the_argmax_and_a_seed_makes_sampling_repeatable() -> None:
    logits = torch.tensor([0.1, 3.0, 0.2, 2.9])
    assert Sampler(temperature=0, top_p=0, seed=0, device="cpu").pick(logits) == 1

    def draws(seed: int) -> list[int]:
        sampler = Sampler(temperature=1.0, top_p=0.0, seed=seed, device="cpu")
        return [sampler.pick(logits) for _ in range(50)]

    assert draws(5) == draws(5)
    assert set(draws(5)) > {1}  # it does sample


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.tensor([5.0, 4.9, -5.0, -5.0])  # ~all the mass on tokens 0 and 1
    sampler = Sampler(temperature=1.0, top_p=0.9, seed=3, device="cpu")
    assert {sampler.pick(logits) for _ in range(200)} == {0, 1}
