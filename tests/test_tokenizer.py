"""Specification of dsv3_jax.tokenizer and dsv3_jax.chat_template.

The tiktoken tokenizer is built here, Kimi-style: a ``tiktoken.model`` holding the 256 single
bytes plus about fifty merges (every prefix of a few chosen words), and a
``tokenizer_config.json`` whose ``added_tokens_decoder`` names special tokens past the ranks.
Ids are checked against a naive BPE written below (merge the lowest-ranked adjacent pair until
none is left). The HF path uses a BPE trained on 100 kB of the embedded corpus. Chat templates
render in a worker process (about 0.1 s each); the runaway-template tests run under a 1.5 s limit.
"""
import ast
import base64
import datetime
import json
import pathlib
import random
import time

import pytest

from dsv3_jax import tokenizer
from dsv3_jax.chat_template import RenderLimits
from dsv3_jax.errors import ConfigError, DataError, MissingFileError

WORDS = ["the", " the", "hello", " hello", "Hello", " world", " token", "izer", "你好", "世界",
         " café", "Ω"]
# Ids past the ranks (256 + merges) relative to the first special id; 5 and 8 are left unnamed.
SPECIALS = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
            6: "<|im_system|>", 7: "<|im_middle|>", 9: "[PAD]"}


def merges() -> list[bytes]:
    out = []
    for word in WORDS:
        b = word.encode()
        out += [b[:k] for k in range(2, len(b) + 1) if b[:k] not in out]
    return out


RANKS = {**{bytes([i]): i for i in range(256)}, **{m: 256 + k for k, m in enumerate(merges())}}
N = len(RANKS)  # the first special id


def write_ranks(path: pathlib.Path, ranks: dict[bytes, int]) -> None:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))


def kimi_dir(path: pathlib.Path, **config) -> pathlib.Path:
    """A Kimi-like model directory: tiktoken.model + tokenizer_config.json (+ ``config``)."""
    path.mkdir(parents=True, exist_ok=True)
    write_ranks(path / "tiktoken.model", RANKS)
    decoder = {str(N + k): {"content": c, "special": True} for k, c in SPECIALS.items()}
    (path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": decoder, "bos_token": "[BOS]", "eos_token": "[EOS]",
        "pad_token": "[PAD]", "tokenizer_class": "TikTokenTokenizer", **config}))
    return path


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    return tokenizer.load_tokenizer(kimi_dir(tmp_path_factory.mktemp("kimi")))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    tokenizer.train_tokenizer(300, d, corpus_max_bytes=100_000)
    return d


def naive_bpe(piece: str) -> list[int]:
    parts = [bytes([b]) for b in piece.encode()]
    while True:
        pairs = [(RANKS[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in RANKS]
        if not pairs:
            return [RANKS[p] for p in parts]
        _, i = min(pairs)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def short_limits(**kw) -> RenderLimits:
    return RenderLimits(**{"seconds": 1.5, **kw})


# ---- tiktoken: ids, round trip, special tokens ---------------------------------------------------
def test_tiktoken_ids_follow_kimis_split_and_the_ranks(kimi):
    text = "Hello the tokenizer, 你好世界! café Ω"
    # Kimi's regex: a capitalized word, words with their leading space, punctuation, Han runs
    pieces = ["Hello", " the", " tokenizer", ",", " ", "你好世界", "!", " café", " Ω"]
    assert kimi.encode(text) == [i for p in pieces for i in naive_bpe(p)]
    assert kimi.encode("hello world") == [RANKS[b"hello"], RANKS[b" world"]]
    assert kimi.encode("你好世界") == [RANKS["你好".encode()], RANKS["世界".encode()]]


@pytest.mark.parametrize("text", [
    "def f(x):\n\treturn x  # ascii, tabs and  double spaces\n",
    "naïve café — 日本語テキスト 🙂 Ωμέγα\r\n",
    " leading space, [EOS] and <|im_end|> in the text, trailing space ",
    "",
])
def test_tiktoken_round_trips(kimi, text):
    ids = kimi.encode(text)
    assert kimi.decode(ids) == text
    assert all(0 <= i < kimi.vocab_size for i in ids)


def test_tiktoken_special_tokens_are_ids_and_reserved_gaps_are_named(kimi):
    assert (kimi.bos_id, kimi.eos_id, kimi.pad_id, kimi.vocab_size) == (N, N + 1, N + 9, N + 10)
    assert kimi.add_bos is False  # no add_bos_token in the config
    ids = kimi.encode("<|im_user|>hi<|im_end|>")
    assert ids == [N + 3, *naive_bpe("hi"), N + 2]
    assert kimi.encode("<|im_end|") == naive_bpe("<|") + naive_bpe("im") + naive_bpe("_end|")
    reserved = f"<|reserved_token_{N + 5}|>"
    assert kimi.encode(reserved) == [N + 5] and kimi.decode([N + 8]) == f"<|reserved_token_{N + 8}|>"
    assert kimi.decode([*naive_bpe("ok"), N + 10, 10**6]) == "ok"  # ids past the table are dropped
    assert kimi.encode_batch(["hello world", "[BOS]x", ""]) == [
        kimi.encode("hello world"), [N, *naive_bpe("x")], []]


def test_tiktoken_long_runs_are_cut_like_kimi(kimi):
    # A million spaces overflow tiktoken's regex stack in one call; in pieces they encode.
    text = "a" + " " * 1_000_000 + "b"
    assert kimi.decode(kimi.encode(text)) == text

    def reference(s, chunk, run):  # Kimi's loop, character by character
        out = []
        for c0 in range(0, len(s), chunk):
            part, start, count, space = s[c0:c0 + chunk], 0, 0, s[c0:c0 + 1].isspace()
            for i, ch in enumerate(part):
                if ch.isspace() != space:
                    count, space = 1, ch.isspace()
                else:
                    count += 1
                    if count > run:
                        out.append(part[start:i])
                        start, count = i, 1
            out.append(part[start:])
        return out or [""]

    rng = random.Random(0)
    for _ in range(200):
        s = "".join(rng.choice("ab \n\u3000") for _ in range(rng.randrange(40)))
        assert tokenizer._tiktoken_pieces(s, chunk=11, run=3) == reference(s, 11, 3), repr(s)


def test_pat_str_from_the_config_and_a_bad_one(tmp_path):
    simple = tokenizer.load_tokenizer(kimi_dir(tmp_path / "a", pat_str=r"\S+|\s+"))
    assert simple.encode("hello world") == [RANKS[b"hello"], RANKS[b" "], *naive_bpe("world")]
    with pytest.raises(DataError, match="pat_str"):
        tokenizer.load_tokenizer(kimi_dir(tmp_path / "b", pat_str="(unclosed"))
    assert simple.fingerprint != tokenizer.load_tokenizer(kimi_dir(tmp_path / "c")).fingerprint


# ---- BOS ---------------------------------------------------------------------------------------
def test_bos_follows_add_bos_token_and_is_never_doubled(tmp_path, kimi):
    tok = tokenizer.load_tokenizer(kimi_dir(tmp_path, add_bos_token=True))
    hi = naive_bpe("hi")
    assert tok.add_bos and tok.encode("hi") == [N, *hi]
    assert tok.encode("[BOS]hi") == [N, *hi]  # already there
    assert tok.encode("hi", add_bos=False) == hi and kimi.encode("hi") == hi
    assert kimi.encode("hi", add_bos=True) == [N, *hi]
    assert tok.encode_batch(["hi"]) == [hi] and tok.encode_batch(["hi"], add_bos=None) == [[N, *hi]]
    with pytest.raises(DataError, match="add_bos_token is true but there is no bos_token"):
        tokenizer.load_tokenizer(kimi_dir(tmp_path / "nobos", add_bos_token=True, bos_token=None))
    with pytest.raises(DataError, match="add_bos_token must be true or false"):
        tokenizer.load_tokenizer(kimi_dir(tmp_path / "str", add_bos_token="yes"))


# ---- chat templates ----------------------------------------------------------------------------
KIMI_TEMPLATE = """\
{%- if tools -%}
<|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}<|im_end|>
{%- endif -%}
{%- for message in messages -%}
  {%- if message['role'] == 'system' and not loop.first -%}{%- continue -%}{%- endif -%}
  {%- if message['role'] == 'stop' -%}{%- break -%}{%- endif -%}
  <|im_{{ message['role'] }}|>{{ message['role'] }}<|im_middle|>{{ message['content'] }}<|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}
"""

V31_TEMPLATE = """\
{% if not thinking is defined %}{% set thinking = false %}{% endif %}
{{ bos_token }}{% for m in messages %}
  {% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}{% else %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}
{% endfor %}
{% if add_generation_prompt %}<｜Assistant｜>{% if thinking %}<think>{% else %}</think>{% endif %}{% endif %}
"""


def test_kimi_like_template_with_tojson_and_loop_controls(tmp_path):
    tok = tokenizer.load_tokenizer(kimi_dir(tmp_path, chat_template=KIMI_TEMPLATE, add_bos_token=True))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好 ☃"},
                {"role": "system", "content": "skipped by continue"},
                {"role": "assistant", "content": "Hi!"}, {"role": "stop"},
                {"role": "user", "content": "after the break"}]
    tools = [{"name": "天气", "parameters": {"city": "string"}}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
    assert text == ('<|im_system|>tool_declare<|im_middle|>[{"name":"天气","parameters":{"city":"string"}}]'
                    "<|im_end|><|im_system|>system<|im_middle|>Be brief.<|im_end|>"
                    "<|im_user|>user<|im_middle|>你好 ☃<|im_end|>"
                    "<|im_assistant|>assistant<|im_middle|>Hi!<|im_end|>"
                    "<|im_assistant|>assistant<|im_middle|>")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tools=tools, tokenize=True)
    assert ids == tok.encode(text, add_bos=False) and ids[0] == N + 6  # no BOS added to a chat
    two = tok.apply_chat_template([messages[1:2], messages[3:4]])
    assert two == [tok.apply_chat_template(messages[1:2]), tok.apply_chat_template(messages[3:4])]


def test_deepseek_v31_like_template_from_chat_template_jinja(hf_dir, tmp_path):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((hf_dir / f).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(add_bos_token=True, chat_template="overridden by chat_template.jinja")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text(V31_TEMPLATE)
    tok = tokenizer.load_tokenizer(tmp_path)
    chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3?"}]
    head = ("<|bos|><｜User｜>2+2?<｜Assistant｜>4<｜end▁of▁sentence｜>"
            "<｜User｜>and 3+3?<｜Assistant｜>")
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == head + "</think>"
    assert tok.apply_chat_template(chat, add_generation_prompt=True, thinking=False) == head + "</think>"
    text = tok.apply_chat_template(chat, add_generation_prompt=True, thinking=True)
    assert text == head + "<think>"
    ids = tok.encode(text)  # add_bos_token is true and the template wrote BOS: still one
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 and tok.decode(ids) == text


def test_strftime_now_generation_tag_and_a_named_template_list(tmp_path):
    listed = [{"name": "tool_use", "template": "T"},
              {"name": "default", "template": "{{ strftime_now('%Y-%m-%d') }} "
                                              "{% generation %}{{ messages|length }}{% endgeneration %}"}]
    tok = tokenizer.load_tokenizer(kimi_dir(tmp_path / "a", chat_template=listed))
    before = datetime.date.today().isoformat()
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert out in {f"{before} 1", f"{datetime.date.today().isoformat()} 1"}
    with pytest.raises(DataError, match=r"no template named 'default' \(it has \['tool_use'\]\)"):
        tokenizer.load_tokenizer(kimi_dir(tmp_path / "b", chat_template=listed[:1]))


def test_raise_exception_is_a_one_line_user_error(tmp_path):
    template = ("{% if messages[0]['role'] != 'user' %}"
                "{{ raise_exception('Conversation must start\nwith a user message') }}{% endif %}ok")
    tok = tokenizer.load_tokenizer(kimi_dir(tmp_path, chat_template=template))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "ok"
    with pytest.raises(ConfigError) as e:
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])
    assert "\n" not in str(e.value)
    assert str(e.value).endswith("tokenizer_config.json[chat_template], line 1: the chat template "
                                 "rejected the conversation: Conversation must start with a user message")


@pytest.mark.parametrize("template,match", [
    ("{% for m in messages %}{{ m }}",
     r"chat_template.jinja, line 1: chat template syntax error: Unexpected end"),
    ("line 1\n{{ foo.bar }}",
     r"chat_template.jinja, line 2: chat template error: UndefinedError: 'foo' is undefined"),
    ("{{ messages.__class__.__mro__ }}", r"chat_template.jinja, line 1: chat template error: SecurityError"),
])
def test_template_errors_name_the_file_and_line(tmp_path, template, match):
    kimi_dir(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(template)
    with pytest.raises(DataError, match=match) as e:
        tokenizer.load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("template,limits,match", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     short_limits(), "still rendering after 1.5 s, stopped"),
    ("{% for i in range(100000) %}{{ 'xxxxxxxxxx' }}{% endfor %}",
     short_limits(chars=10_000), "rendered more than 10000 characters, stopped"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}{{ ns.s|length }}", short_limits(memory_mib=256), "needed more than 256 MiB, stopped"),
], ids=["nested_loops", "output", "memory"])
def test_a_runaway_template_is_stopped(tmp_path, template, limits, match):
    tok = tokenizer.load_tokenizer(kimi_dir(tmp_path, chat_template=template))
    tok.template_limits = limits
    t0 = time.monotonic()
    with pytest.raises(DataError, match=match):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 5


def test_no_chat_template_and_non_json_arguments(kimi, tmp_path):
    with pytest.raises(DataError, match="no chat_template"):
        kimi.apply_chat_template([{"role": "user", "content": "hi"}])
    tok = tokenizer.load_tokenizer(kimi_dir(tmp_path, chat_template="{{ thinking }}"))
    with pytest.raises(ConfigError, match="chat template arguments must be JSON values"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], thinking=object())


# ---- bad files ---------------------------------------------------------------------------------
def _lines(ranks):
    return [f"{base64.b64encode(t).decode()} {r}" for t, r in ranks.items()]


@pytest.mark.parametrize("case,match", [
    ("bad_base64", r"tiktoken.model, line 3: expected '<base64 token> <rank>' lines"),
    ("no_rank", r"tiktoken.model, line 3: expected"),
    ("duplicate", r"tiktoken.model, line 300: token b'he' is listed twice"),
    ("gap", r"the ranks must be 0 to \d+, each once"),
    ("missing_byte", r"1 of the 256 single bytes have no token \(first: 0x41\)"),
    ("empty", r"tiktoken.model: no tokens"),
    ("low_special_id", r"added_tokens_decoder entry '5': expected an id >= \d+"),
])
def test_malformed_tiktoken_files(tmp_path, case, match):
    kimi_dir(tmp_path)
    lines = _lines(RANKS)
    if case == "bad_base64":
        lines[2] = "!!!not-base64 2"
    elif case == "no_rank":
        lines[2] = lines[2].split()[0]
    elif case == "duplicate":
        lines.insert(299, f"{base64.b64encode(b'he').decode()} {N}")
    elif case == "gap":
        lines[-1] = lines[-1].split()[0] + f" {N + 3}"
    elif case == "missing_byte":
        lines = _lines({t: r - (r > 65) for t, r in RANKS.items() if t != b"A"})
    elif case == "empty":
        lines = ["", "  "]
    elif case == "low_special_id":
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
        config["added_tokens_decoder"]["5"] = {"content": "<x>"}
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tiktoken.model").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=match) as e:
        tokenizer.load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,text,match", [
    ("tokenizer.json", "{not json", r"tokenizer.json: not a JSON file \(.*line 1 column 2.*\); "
                                    "expected an HF tokenizers tokenizer.json"),
    ("tokenizer.json", '{"a": 1}', r"tokenizer.json: not an HF tokenizers tokenizer.json: "),
    ("tokenizer_config.json", "[1,", r"tokenizer_config.json: not a JSON file"),
    ("tokenizer_config.json", "[1]", r"tokenizer_config.json: expected a JSON object, got list"),
])
def test_bad_json_files(hf_dir, tmp_path, name, text, match):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((hf_dir / f).read_bytes())
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=match) as e:
        tokenizer.load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(MissingFileError, match="no tokenizer.json or tiktoken.model in it"):
        tokenizer.load_tokenizer(tmp_path)
    with pytest.raises(MissingFileError, match="no such file or directory"):
        tokenizer.load_tokenizer(tmp_path / "nowhere")


# ---- the HF path, and imports ------------------------------------------------------------------
def test_trained_hf_tokenizer_still_loads_and_round_trips(hf_dir):
    tok = tokenizer.load_tokenizer(hf_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size, tok.add_bos) == (0, 1, 2, 300, False)
    for text in ("import os\n", "naïve café — 日本語 🙂", " <|eos|> inside "):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("import os\n")) < len("import os\n")
    assert tok.encode("x", add_bos=True)[0] == 0
    file_itself = tokenizer.load_tokenizer(hf_dir / "tokenizer.json")
    assert file_itself.fingerprint == tok.fingerprint


def test_tiktoken_and_jinja2_are_imported_only_when_used():
    """The package imports without tiktoken; jinja2 is needed only in the render worker."""
    for name in ("tokenizer.py", "chat_template.py"):
        tree = ast.parse((pathlib.Path(tokenizer.__file__).parent / name).read_text())
        top = {a.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for a in node.names}
        top |= {(node.module or "").split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
        assert not top & {"tiktoken", "jinja2"}, (name, top)
