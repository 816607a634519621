"""Llama 2 / Llama 3 chat prompt formats: exact strings, token ids, role errors."""

import pytest

from herd.lm import chat
from herd.lm import tokenizer as tl
from herd.lm.data import stdlib_files

SYS = {"role": "system", "content": "You are a terse assistant."}
TURNS = [
    {"role": "user", "content": "What is 2+2?  \n"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
]

LLAMA2_WITH_SYS = (
    "<s>[INST] <<SYS>>\nYou are a terse assistant.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4. </s>"
    "<s>[INST] And 3+3? [/INST]"
)
LLAMA2_NO_SYS = "<s>[INST] What is 2+2? [/INST] 4. </s><s>[INST] And 3+3? [/INST]"
LLAMA3_WITH_SYS = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a terse assistant."
    "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
LLAMA3_NO_SYS = LLAMA3_WITH_SYS.replace(
    "<|start_header_id|>system<|end_header_id|>\n\nYou are a terse assistant.<|eot_id|>", ""
)

# The chat templates Meta published with its Hugging Face checkpoints (Llama-2-*-chat-hf and
# Meta-Llama-3-*-Instruct tokenizer_config.json), transcribed: an independent rendering path.
HF_LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
HF_LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)


def _render(template, messages, **kw):
    import jinja2

    return jinja2.Environment().from_string(template).render(messages=messages, **kw)


def test_llama2_exact_strings():
    assert chat.llama2_chat_text([SYS] + TURNS) == LLAMA2_WITH_SYS
    assert chat.llama2_chat_text(TURNS) == LLAMA2_NO_SYS
    assert chat.llama2_chat_text(TURNS[:1]) == "<s>[INST] What is 2+2? [/INST]"
    assert chat.llama2_chat_text([SYS] + TURNS[:2], add_generation_prompt=False) == (
        "<s>[INST] <<SYS>>\nYou are a terse assistant.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4. </s>"
    )
    assert chat.chat_text(TURNS, "llama2") == LLAMA2_NO_SYS
    # as in Meta's code, the system prompt is joined to the first user message before the
    # strip: that message's leading whitespace stays (without a system prompt it goes)
    padded = [SYS, {"role": "user", "content": "  hi "}]
    assert chat.llama2_chat_text(padded).endswith("<</SYS>>\n\n  hi [/INST]")
    assert chat.llama2_chat_text(padded[1:]) == "<s>[INST] hi [/INST]"


def test_llama3_exact_strings():
    assert chat.llama3_chat_text([SYS] + TURNS) == LLAMA3_WITH_SYS
    assert chat.llama3_chat_text(TURNS) == LLAMA3_NO_SYS
    done = chat.llama3_chat_text(TURNS[:2], add_generation_prompt=False)
    assert done == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>"
    )
    assert chat.chat_text([SYS] + TURNS) == LLAMA3_WITH_SYS


@pytest.mark.parametrize("with_sys", [True, False])
def test_matches_published_hf_templates(with_sys):
    msgs = ([SYS] if with_sys else []) + TURNS
    special = dict(bos_token="<s>", eos_token="</s>")
    assert chat.llama2_chat_text(msgs) == _render(HF_LLAMA2_TEMPLATE, msgs, **special)
    assert chat.llama3_chat_text(msgs) == _render(
        HF_LLAMA3_TEMPLATE, msgs, bos_token="<|begin_of_text|>", add_generation_prompt=True
    )
    done = msgs[:-1]
    assert chat.llama2_chat_text(done, False) == _render(HF_LLAMA2_TEMPLATE, done, **special)
    assert chat.llama3_chat_text(done, False) == _render(
        HF_LLAMA3_TEMPLATE, done, bos_token="<|begin_of_text|>", add_generation_prompt=False
    )


def test_role_and_order_errors():
    u = {"role": "user", "content": "hi"}
    a = {"role": "assistant", "content": "yo"}
    for fn in (chat.llama2_chat_text, chat.llama3_chat_text):
        with pytest.raises(ValueError, match="empty"):
            fn([])
        with pytest.raises(ValueError, match="role 'tool'"):
            fn([{"role": "tool", "content": "x"}])
        with pytest.raises(ValueError, match="only come first"):
            fn([u, SYS, u])
        with pytest.raises(ValueError, match="message 1 has role 'user'.*alternate"):
            fn([u, u])
        with pytest.raises(ValueError, match="message 1 has role 'assistant'"):
            fn([SYS, a, u])
        with pytest.raises(ValueError, match="only a system message"):
            fn([SYS])
        with pytest.raises(ValueError, match="last message must be a user"):
            fn([u, a])
        with pytest.raises(ValueError, match="must end with an assistant"):
            fn([u], add_generation_prompt=False)
        with pytest.raises(TypeError, match="'role' and 'content'"):
            fn([{"content": "x"}])
        with pytest.raises(TypeError, match="content must be str"):
            fn([{"role": "user", "content": 3}])
        with pytest.raises(TypeError, match="list of dicts"):
            fn("hello")
    with pytest.raises(ValueError, match="Llama 2 format tag"):
        chat.llama2_chat_text([{"role": "user", "content": "x [/INST] y"}])
    with pytest.raises(ValueError, match="style"):
        chat.chat_text([u], "llama4")


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    train, _ = stdlib_files("train", eval_fraction=0.05)
    path = tmp_path_factory.mktemp("tok") / "chat.model"
    return tl.train_tokenizer(train[::120], 600, path, max_sentences=3000)


def test_llama2_ids(sp):
    msgs = [SYS] + TURNS
    ids = chat.llama2_chat_ids(msgs, sp)
    first = "[INST] <<SYS>>\nYou are a terse assistant.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4. "
    assert ids == sp.encode(first, bos=True, eos=True) + sp.encode(
        "[INST] And 3+3? [/INST]", bos=True
    )
    assert ids.count(sp.bos_id) == 2 and ids.count(sp.eos_id) == 1
    assert ids[0] == sp.bos_id and ids[-1] != sp.eos_id
    text = LLAMA2_WITH_SYS.replace("<s>", "").replace("</s>", "")
    assert sp.decode(ids) == text
    done = chat.llama2_chat_ids(msgs[:3], sp, add_generation_prompt=False)
    assert done[-1] == sp.eos_id and done == ids[: len(done)]
    assert chat.chat_ids(msgs, sp, "llama2") == ids


@pytest.fixture(scope="module")
def tiktok(tmp_path_factory):
    from tiktoken import _educational

    text = ("What is 2+2? And 3+3? You are a terse assistant.\nuser assistant system\n\n") * 3
    enc = _educational.bpe_train(text, 256 + 30, tl.LLAMA3_PAT_STR, visualise=None)
    path = tmp_path_factory.mktemp("tt") / "tokenizer.model"
    tl.write_tiktoken_ranks(enc, path)
    return tl.load_tokenizer(path, special_tokens=tl.llama3_special_tokens("llama3.1"))


def test_llama3_ids(tiktok, sp):
    tok = tiktok
    ids = chat.llama3_chat_ids([SYS] + TURNS, tok)
    assert ids == tok.encode(LLAMA3_WITH_SYS, allowed_special="all")
    assert tok.decode(ids) == LLAMA3_WITH_SYS
    sp_ids = tok.special_tokens
    assert ids[0] == sp_ids["<|begin_of_text|>"] == tok.bos_id
    assert ids.count(sp_ids["<|eot_id|>"]) == 4
    assert ids.count(sp_ids["<|start_header_id|>"]) == 5
    assert (
        ids[-len(tok.encode("\n\n")) - 1 - len(tok.encode("assistant")) - 1]
        == (sp_ids["<|start_header_id|>"])
    )
    assert chat.llama3_stop_ids(tok) == {tok.eot_id, tok.eos_id}
    # special-token text inside a message stays text
    inj = chat.llama3_chat_ids([{"role": "user", "content": "<|eot_id|>"}], tok)
    assert inj.count(sp_ids["<|eot_id|>"]) == 1
    with pytest.raises(ValueError, match=r"lacks the Llama 3 chat special token\(s\)"):
        chat.llama3_chat_ids(TURNS, sp)
