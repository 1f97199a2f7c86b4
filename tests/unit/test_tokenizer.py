"""Tests for the runtime tokenizer wrapper and the offline BPE construction."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import tokenizers

from data_pipelines.tokenizer import MIN_VOCAB_SIZE, byte_tokenizer, train_bpe
from workbench.data.tokenizer import SPECIAL_TOKENS, Tokenizer, check_fits
from workbench.errors import DataError

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 5,
    "module counter(input clk, output reg [3:0] q); always @(posedge clk) q <= q + 1; endmodule\n",
    "for i in range(10):\n    print(i)\n" * 3,
    "Grüße aus Köln — naïve café, 東京, 😀👍\n",
] * 4

TRICKY = [
    "",
    " ",
    "a",
    "hello world",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\n\n\n",
    "    \t  \n  runs of   whitespace     ",
    "naïve café Grüße ñ",
    "日本語のテキスト 中文 한국어",
    "emoji 😀👍🏽👨‍👩‍👧 flags 🇫🇷",
    "\x00\x01\x7f control \u200b zero width \ufeff bom",
    "def f(x):\n    return x ** 2  # comment\n",
    "'s 're 'll  don't",
    "<|bos|",
    "<think",
    "think>",
    "< think >",
    "<<think>>",
]


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return train_bpe(TEXTS, 400)


@pytest.fixture(scope="module")
def byte_tok() -> Tokenizer:
    return byte_tokenizer()


def random_strings(count: int, seed: int = 0) -> list[str]:
    """Seeded random strings over ASCII, Latin, CJK, emoji and other planes (surrogates excluded)."""
    rng = random.Random(seed)
    ranges = [
        (0x00, 0x7F),
        (0x80, 0x24F),
        (0x370, 0x3FF),
        (0x4E00, 0x9FFF),
        (0xE000, 0xFFFD),
        (0x1F300, 0x1FAFF),
        (0x10000, 0x10FFFF),
    ]
    strings = []
    for _ in range(count):
        chars = []
        for _ in range(rng.randint(1, 40)):
            lo, hi = rng.choice(ranges)
            chars.append(chr(rng.randint(lo, hi)))
        strings.append("".join(chars))
    return strings


# --- reserved tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["trained", "byte_tok"])
def test_reserved_tokens_are_ids_0_to_11_in_order(which: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(which)
    assert [tok.token_to_id(name) for name in SPECIAL_TOKENS] == list(range(12))
    assert [tok.id_to_token(i) for i in range(12)] == list(SPECIAL_TOKENS)
    assert tok.special_ids == {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    assert tok.has_reserved_tokens
    tok.require_reserved()
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.eos_ids == frozenset({1})


def test_byte_tokenizer_has_specials_plus_256_bytes(byte_tok: Tokenizer) -> None:
    assert byte_tok.vocab_size == len(SPECIAL_TOKENS) + 256 == MIN_VOCAB_SIZE == 268
    text = "héllo 😀"
    assert len(byte_tok.encode(text, add_special_tokens=False)) == len(text.encode("utf-8"))
    assert set(byte_tok.encode(text)) <= set(range(268))


def test_trained_tokenizer_learns_merges(trained: Tokenizer) -> None:
    assert MIN_VOCAB_SIZE < trained.vocab_size <= 400
    text = "The quick brown fox"
    assert len(trained.encode(text, add_special_tokens=False)) < len(text.encode("utf-8"))


@pytest.mark.parametrize("which", ["trained", "byte_tok"])
def test_specials_are_never_split(which: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(which)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.encode(name, add_special_tokens=False) == [i]
    ids = tok.encode("x = 1 <answer>42</answer> done", add_special_tokens=False)
    pieces = [tok.encode(part, add_special_tokens=False) for part in ("x = 1 ", "42", " done")]
    assert ids == [*pieces[0], 9, *pieces[1], 10, *pieces[2]]


def test_require_reserved_names_missing_tokens() -> None:
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.add_special_tokens(["<|bos|>", "<|eos|>"])
    tok = Tokenizer(backend)
    assert not tok.has_reserved_tokens
    assert tok.special_ids == {"<|bos|>": 0, "<|eos|>": 1}
    assert tok.pad_id == 1  # no pad token: pad falls back to eos
    with pytest.raises(DataError, match=r"<\|pad\|>.*<image>") as info:
        tok.require_reserved()
    assert "<|bos|>" not in str(info.value)


# --- encode / decode -----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["trained", "byte_tok"])
def test_bos_comes_from_the_post_processor(which: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(which)
    plain = tok.encode("hello world", add_special_tokens=False)
    assert tok.encode("hello world") == [tok.bos_id, *plain]
    assert 0 not in plain
    assert tok.encode_batch(["hello", "world"]) == [tok.encode("hello"), tok.encode("world")]
    assert tok.encode_batch(["hello"], add_special_tokens=False) == [
        tok.encode("hello", add_special_tokens=False)
    ]


def test_no_bos_without_a_post_processor(byte_tok: Tokenizer) -> None:
    """A GPT-2 style tokenizer.json (no template) must not gain a bos: parity with Hugging Face."""
    backend = tokenizers.Tokenizer.from_str(byte_tok.backend.to_str())
    backend.post_processor = None
    tok = Tokenizer(backend)
    assert tok.bos_id == 0  # the token exists...
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False) == byte_tok.encode("hi")[1:]


@pytest.mark.parametrize("which", ["trained", "byte_tok"])
def test_round_trip_tricky_and_random_strings(which: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(which)
    for text in TRICKY + random_strings(200):
        if any(name in text for name in SPECIAL_TOKENS):
            continue  # random text is vanishingly unlikely to contain one; covered below
        assert tok.decode(tok.encode(text)) == text, repr(text)
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text, repr(text)
    batch = random_strings(20, seed=1)
    assert [tok.decode(ids) for ids in tok.encode_batch(batch)] == batch


@pytest.mark.parametrize("which", ["trained", "byte_tok"])
def test_literal_special_token_text_round_trips_without_skipping(
    which: str, request: pytest.FixtureRequest
) -> None:
    tok: Tokenizer = request.getfixturevalue(which)
    text = "question <think>step 1, then 2</think><answer> 42 </answer><image>"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "question step 1, then 2 42 "
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == "<|bos|>" + text


def test_decode_accepts_any_int_iterable(byte_tok: Tokenizer) -> None:
    np = pytest.importorskip("numpy")
    ids = byte_tok.encode("abc")
    assert byte_tok.decode(np.array(ids, dtype=np.int64)) == "abc"
    assert byte_tok.decode(iter(ids)) == "abc"


# --- training --------------------------------------------------------------------------------


def test_training_is_deterministic() -> None:
    first = train_bpe(TEXTS, 350)
    second = train_bpe(iter(list(TEXTS)), 350)
    vocab = json.loads(first.backend.to_str())["model"]
    assert vocab == json.loads(second.backend.to_str())["model"]
    assert first.backend.to_str() == second.backend.to_str()
    assert len(vocab["merges"]) > 0


def test_byte_tokenizer_has_no_merges(byte_tok: Tokenizer) -> None:
    assert json.loads(byte_tok.backend.to_str())["model"]["merges"] == []


@pytest.mark.parametrize("bad", [0, 100, MIN_VOCAB_SIZE - 1, 300.0, True])
def test_vocab_size_too_small_is_a_data_error(bad: object) -> None:
    with pytest.raises(DataError, match=rf"vocab_size .*at least {MIN_VOCAB_SIZE}.*got {bad!r}"):
        train_bpe(TEXTS, bad)  # type: ignore[arg-type]


def test_minimum_vocab_size_is_accepted() -> None:
    assert train_bpe(TEXTS, MIN_VOCAB_SIZE).vocab_size == MIN_VOCAB_SIZE


def test_check_fits_names_both_sizes(trained: Tokenizer) -> None:
    check_fits(trained, trained.vocab_size)
    check_fits(trained, 50304)
    with pytest.raises(DataError) as info:
        check_fits(trained, 300, what="draft model")
    message = str(info.value)
    assert f"tokenizer has {trained.vocab_size} tokens" in message
    assert "draft model's vocab_size is 300" in message
    assert f"at least {trained.vocab_size}" in message
    assert "\n" not in message


# --- loading and saving --------------------------------------------------------------------------


def test_save_and_from_file_round_trip(trained: Tokenizer, tmp_path: Path) -> None:
    path = trained.save(tmp_path / "sub" / "tokenizer.json")
    assert path == tmp_path / "sub" / "tokenizer.json"
    loaded = Tokenizer.from_file(path)
    assert loaded.vocab_size == trained.vocab_size
    assert loaded.encode("hello <think> world") == trained.encode("hello <think> world")
    assert (loaded.bos_id, loaded.eos_ids, loaded.pad_id) == (0, frozenset({1}), 2)
    assert trained.save(tmp_path) == tmp_path / "tokenizer.json"  # a directory gets tokenizer.json
    assert Tokenizer.from_file(tmp_path / "tokenizer.json").vocab_size == trained.vocab_size


def _hf_dir(tmp_path: Path, tok: Tokenizer, **files: dict) -> Path:
    directory = tmp_path / "model"
    directory.mkdir()
    tok.save(directory / "tokenizer.json")
    for name, content in files.items():
        (directory / f"{name}.json").write_text(json.dumps(content))
    return directory


def test_from_hf_dir_reads_config_and_generation_config(byte_tok: Tokenizer, tmp_path: Path) -> None:
    directory = _hf_dir(
        tmp_path,
        byte_tok,
        config={"bos_token_id": 5, "eos_token_id": 6, "vocab_size": 268},
        generation_config={"eos_token_id": [7, 6, 8]},
    )
    tok = Tokenizer.from_hf_dir(directory)
    assert tok.bos_id == 5
    assert tok.eos_id == 7  # generation_config wins over config
    assert tok.eos_ids == frozenset({6, 7, 8})
    assert tok.pad_id == 2  # nothing sets a pad: the reserved <|pad|>


def test_from_hf_dir_precedence_and_tokenizer_config(byte_tok: Tokenizer, tmp_path: Path) -> None:
    directory = _hf_dir(
        tmp_path,
        byte_tok,
        generation_config={"bos_token_id": 3, "pad_token_id": None},
        config={"bos_token_id": 4, "pad_token_id": 11},
        tokenizer_config={
            "bos_token": "<|user|>",
            "eos_token": {"content": "<|end|>", "special": True},
            "pad_token": None,
        },
    )
    tok = Tokenizer.from_hf_dir(directory)
    assert tok.bos_id == 3
    assert tok.eos_id == 6 and tok.eos_ids == frozenset({6})
    assert tok.pad_id == 11


def test_from_hf_dir_without_metadata_or_reserved_tokens(byte_tok: Tokenizer, tmp_path: Path) -> None:
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.add_special_tokens(["<s>", "</s>"])
    plain = _hf_dir(tmp_path, Tokenizer(backend), tokenizer_config={"eos_token": "</s>"})
    tok = Tokenizer.from_hf_dir(plain)
    assert (tok.bos_id, tok.eos_id, tok.eos_ids, tok.pad_id) == (None, 1, frozenset({1}), 1)
    assert not tok.has_reserved_tokens


@pytest.mark.parametrize(
    ("files", "match"),
    [
        (
            {"config": {"eos_token_id": 9999}},
            r"config\.json: eos_token_id must be a token id in \[0, 268\), got 9999",
        ),
        ({"generation_config": {"bos_token_id": "1"}}, r"generation_config\.json: bos_token_id"),
        ({"tokenizer_config": {"eos_token": "<nope>"}}, r"tokenizer_config\.json: eos_token '<nope>'"),
        ({"config": [1, 2]}, r"config\.json: expected a JSON object"),
    ],
)
def test_from_hf_dir_bad_metadata(byte_tok: Tokenizer, tmp_path: Path, files: dict, match: str) -> None:
    directory = _hf_dir(tmp_path, byte_tok, **files)
    with pytest.raises(DataError, match=match):
        Tokenizer.from_hf_dir(directory)


def test_missing_paths_raise_data_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=re.escape(f"tokenizer directory {missing} does not exist")):
        Tokenizer.from_hf_dir(missing)
    with pytest.raises(
        DataError, match=re.escape(f"tokenizer file {missing / 'tokenizer.json'} does not exist")
    ):
        Tokenizer.from_file(missing / "tokenizer.json")
    with pytest.raises(DataError, match=re.escape(f"tokenizer directory {tmp_path} has no tokenizer.json")):
        Tokenizer.from_hf_dir(tmp_path)
    with pytest.raises(DataError, match=re.escape(f"tokenizer file {tmp_path} is not a file")):
        Tokenizer.from_file(tmp_path)


@pytest.mark.parametrize("content", ["not json at all", '{"version": "1.0"}', ""])
def test_garbage_tokenizer_json_is_a_data_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    for load in (lambda: Tokenizer.from_file(path), lambda: Tokenizer.from_hf_dir(tmp_path)):
        expected = re.escape(f"tokenizer file {path}: not a valid tokenizers JSON file (") + r".+\)$"
        with pytest.raises(DataError, match=expected) as info:
            load()
        assert "\n" not in str(info.value)
