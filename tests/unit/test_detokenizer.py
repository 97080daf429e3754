import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from genserve.engine.detokenizer import IncrementalDetokenizer
from genserve.runtime.build import token_decoder
from tests.tiny_model import build_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return build_tokenizer(Path(tmp_path_factory.mktemp("tok")))


def stream(tok, text: str, stop=(), include_stop: bool = False) -> tuple[str, bool]:
    d = IncrementalDetokenizer(tok, [], tuple(stop), include_stop)
    out, stopped = [], False
    for t in tok.encode(text):
        r = d.push(t)
        out.append(r.text)
        if r.stopped:
            stopped = True
            break
    if not stopped:
        out.append(d.flush())
    return "".join(out), stopped


@pytest.mark.parametrize("text", ["hello world", "naïve café — ünïcödé ✓ 日本語", "a\n\tb  c"])
def test_incremental_text_equals_whole_decode(tok, text: str) -> None:
    assert stream(tok, text) == (tok.decode(tok.encode(text)), False)


def test_multibyte_character_is_never_split(tok) -> None:
    d = IncrementalDetokenizer(tok, [], ())
    pieces = [d.push(t).text for t in tok.encode("日本語")]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + d.flush() == "日本語"


def test_stop_string_spanning_tokens_is_cut_exactly(tok) -> None:
    text = "the quick brown fox jumps"
    stop = "ck bro"  # spans token boundaries
    assert stream(tok, text, [stop]) == ("the qui", True)


def test_text_that_only_looks_like_a_stop_start_is_released(tok) -> None:
    out, stopped = stream(tok, "abc ab", ["abx"])
    assert (out, stopped) == ("abc ab", False)


def test_earliest_of_several_stops_wins(tok) -> None:
    assert stream(tok, "one two three", ["three", "two"]) == ("one ", True)


def test_include_stop_keeps_the_stop_string_and_cuts_after_it(tok) -> None:
    """vLLM's include_stop_str_in_output: the text ends with the stop string, and nothing that
    was decoded after it (the same token may carry more) is sent."""
    assert stream(tok, "the quick brown fox jumps", ["ck bro"], True) == ("the quick bro", True)
    assert stream(tok, "one two three", ["three", "two"], True) == ("one two", True)
    assert stream(tok, "abc ab", ["abx"], True) == ("abc ab", False)


def test_special_tokens_are_skipped_unless_asked_for(tok) -> None:
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids
    for skip in (True, False):
        d = IncrementalDetokenizer(tok, [], (), skip_special=skip)
        text = "".join(d.push(t).text for t in ids) + d.flush()
        assert text == tok.decode(ids, skip_special_tokens=skip)
    assert "<|im_end|>" in tok.decode(ids, skip_special_tokens=False)
    # A stop string can be a special token's text once that text is in the output.
    d = IncrementalDetokenizer(tok, [], ("<|im_end|>",), True, skip_special=False)
    pieces = []
    for t in ids:
        r = d.push(t)
        pieces.append(r.text)
        if r.stopped:
            break
    assert "".join(pieces) == "<|im_start|>user\nhi<|im_end|>"


def test_unfinished_character_is_flushed_as_replacement(tok) -> None:
    ids = tok.encode("日")
    d = IncrementalDetokenizer(tok, [], ())
    text = "".join(d.push(t).text for t in ids[:-1]) + d.flush()
    assert text == tok.decode(ids[:-1])


def test_the_engines_decoder_gives_the_tokenizers_text(tok) -> None:
    """token_decoder skips transformers' wrapper only where it adds nothing: on the bundled
    starter's tokenizer and the tests' own, its text equals tokenizer.decode's for random ids
    (special ones included, skipped or not) and streamed; a tokenizer that cleans up spaces
    keeps its own."""
    starter = AutoTokenizer.from_pretrained(
        Path(__file__).parents[2] / "genserve" / "bundled" / "genserve-starter"
    )
    rng = random.Random(0)
    for t in (tok, starter):
        if t.clean_up_tokenization_spaces:
            assert token_decoder(t) is t
            continue
        dec = token_decoder(t)
        assert dec is not t
        for _ in range(500):
            ids = [rng.randrange(len(t)) for _ in range(rng.randrange(1, 8))]
            for skip in (True, False):
                assert dec.decode(ids, skip) == t.decode(ids, skip_special_tokens=skip), ids
        text = "naïve café ✓ 日本語"
        d = IncrementalDetokenizer(dec, [], ())
        pieces = [d.push(i).text for i in t.encode(text)] + [d.flush()]
        assert "".join(pieces) == t.decode(t.encode(text))
    starter.clean_up_tokenization_spaces = True
    assert token_decoder(starter) is starter
