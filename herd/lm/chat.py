"""Llama 2 and Llama 3 chat prompt formats (RECIPES.md "Chat formats"; Meta's reference code).

Messages are ``[{'role': 'system'|'user'|'assistant', 'content': str}, ...]``: an optional
system message first, then user / assistant turns alternating, starting with a user turn.
With ``add_generation_prompt=True`` (a prompt to generate the next answer from) the last message
must be a user turn; with ``False`` (a finished conversation, e.g. for fine-tuning) an assistant
turn. Contents are stripped of surrounding whitespace, as Meta's code does (Llama 2: the system
prompt is joined to the first user message and the whole stripped, so only its outer whitespace
goes).

Llama 2 (Meta's ``chat_completion``: each user/answer pair is one encode with BOS and EOS, the
system prompt goes inside the first user turn)::

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>
    <s>[INST] {user} [/INST]                         (one line: nothing between </s> and <s>)

``[INST]``, ``[/INST]``, ``<<SYS>>``, ``<</SYS>>`` are plain text (no special tokens); contents
containing them are refused, as Meta's code refuses them. In the text form ``<s>`` / ``</s>``
stand for BOS / EOS (the ids form uses the tokenizer's bos/eos ids).

Llama 3 (Meta's ``ChatFormat``: header and end-of-turn special tokens)::

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n          (generation prompt)

(one line, no newlines between turns). The ids form needs a tokenizer whose ``special_tokens``
has those four tokens (``TiktokenTokenizer`` with Llama 3's special tokens); content text is
encoded as plain text, so special-token strings inside a message cannot inject control tokens.

Public API::

    ROLES = ('system', 'user', 'assistant')
    validate_messages(messages, add_generation_prompt=True) -> list[dict]  # ValueError/TypeError
    llama2_chat_text(messages, add_generation_prompt=True) -> str
    llama2_chat_ids(messages, tokenizer, add_generation_prompt=True) -> list[int]
    llama3_chat_text(messages, add_generation_prompt=True) -> str
    llama3_chat_ids(messages, tokenizer, add_generation_prompt=True) -> list[int]
    chat_text(messages, style='llama3'|'llama2', ...) / chat_ids(messages, tokenizer, style, ...)
    llama3_stop_ids(tokenizer) -> set[int]     # <|eot_id|> and <|end_of_text|>
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

ROLES = ("system", "user", "assistant")
STYLES = ("llama2", "llama3")

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
LLAMA2_SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
LLAMA2_BOS_TEXT, LLAMA2_EOS_TEXT = "<s>", "</s>"

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"


def validate_messages(
    messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
) -> list[dict[str, str]]:
    """Checks roles and order; returns the messages as plain dicts (contents unchanged)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a chat needs at least one user message")
    out: list[dict[str, str]] = []
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise TypeError(f"message {k} must be a dict with 'role' and 'content', got {m!r}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ValueError(f"message {k} has role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise TypeError(f"message {k} content must be str, got {type(content).__name__}")
        if role == "system" and k != 0:
            raise ValueError(f"message {k}: a system message may only come first")
        out.append({"role": role, "content": content})
    turns = out[1:] if out[0]["role"] == "system" else out
    if not turns:
        raise ValueError("messages has only a system message: a chat needs a user message")
    offset = len(out) - len(turns)
    for k, m in enumerate(turns):
        want = "user" if k % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(
                f"message {k + offset} has role {m['role']!r} where {want!r} was expected: "
                "after an optional system message, roles must alternate user/assistant/user/..."
            )
    last = turns[-1]["role"]
    if add_generation_prompt and last != "user":
        raise ValueError(
            "the last message must be a user message to prompt for an answer "
            "(add_generation_prompt=False formats a finished conversation)"
        )
    if not add_generation_prompt and last != "assistant":
        raise ValueError(
            "with add_generation_prompt=False the conversation must end with an assistant message"
        )
    return out


# ------------------------------------------------------------------------------------------
# Llama 2
# ------------------------------------------------------------------------------------------


def _llama2_segments(messages, add_generation_prompt: bool) -> list[tuple[str, bool]]:
    """[(text, closed)]: each text is encoded with BOS, and with EOS when closed."""
    msgs = validate_messages(messages, add_generation_prompt)
    for k, m in enumerate(msgs):
        bad = [tag for tag in LLAMA2_SPECIAL_TAGS if tag in m["content"]]
        if bad:
            raise ValueError(
                f"message {k} contains the Llama 2 format tag(s) {bad}, which are not allowed "
                "in the content"
            )
    if msgs[0]["role"] == "system":
        first = B_SYS + msgs[0]["content"] + E_SYS + msgs[1]["content"]
        msgs = [{"role": "user", "content": first}] + msgs[2:]
    segments = []
    for user, answer in zip(msgs[::2], msgs[1::2], strict=False):
        u, a = user["content"].strip(), answer["content"].strip()
        segments.append((f"{B_INST} {u} {E_INST} {a} ", True))
    if add_generation_prompt:
        segments.append((f"{B_INST} {msgs[-1]['content'].strip()} {E_INST}", False))
    return segments


def llama2_chat_text(messages, add_generation_prompt: bool = True) -> str:
    """The Llama 2 chat prompt as text, BOS / EOS written as ``<s>`` / ``</s>``."""
    return "".join(
        LLAMA2_BOS_TEXT + text + (LLAMA2_EOS_TEXT if closed else "")
        for text, closed in _llama2_segments(messages, add_generation_prompt)
    )


def llama2_chat_ids(messages, tokenizer, add_generation_prompt: bool = True) -> list[int]:
    """The Llama 2 chat prompt as token ids: each turn encoded with BOS, answered ones with
    EOS (``tokenizer.encode(text, bos=True, eos=closed)``)."""
    ids: list[int] = []
    for text, closed in _llama2_segments(messages, add_generation_prompt):
        ids.extend(tokenizer.encode(text, bos=True, eos=closed))
    return ids


# ------------------------------------------------------------------------------------------
# Llama 3
# ------------------------------------------------------------------------------------------


def llama3_chat_text(messages, add_generation_prompt: bool = True) -> str:
    """The Llama 3 chat prompt as text (special tokens written out)."""
    msgs = validate_messages(messages, add_generation_prompt)
    parts = [BEGIN_OF_TEXT]
    for m in msgs:
        parts.append(f"{START_HEADER}{m['role']}{END_HEADER}\n\n{m['content'].strip()}{EOT}")
    if add_generation_prompt:
        parts.append(f"{START_HEADER}assistant{END_HEADER}\n\n")
    return "".join(parts)


def _llama3_special(tokenizer) -> dict[str, int]:
    specials = getattr(tokenizer, "special_tokens", None) or {}
    names = (BEGIN_OF_TEXT, END_OF_TEXT, START_HEADER, END_HEADER, EOT)
    missing = [n for n in names if n not in specials]
    if missing:
        raise ValueError(
            f"tokenizer {tokenizer!r} lacks the Llama 3 chat special token(s) "
            f"{', '.join(missing)}: use a Llama 3 tokenizer (TiktokenTokenizer with "
            "herd.lm.tokenizer.llama3_special_tokens()) or the Llama 2 format"
        )
    return {n: int(specials[n]) for n in names}


def llama3_stop_ids(tokenizer) -> set[int]:
    """Ids that end an assistant turn: <|eot_id|> and <|end_of_text|>."""
    sp = _llama3_special(tokenizer)
    return {sp[EOT], sp[END_OF_TEXT]}


def llama3_chat_ids(messages, tokenizer, add_generation_prompt: bool = True) -> list[int]:
    """The Llama 3 chat prompt as token ids: special tokens by id, role names, the blank line
    and contents encoded separately as plain text (Meta's ChatFormat)."""
    msgs = validate_messages(messages, add_generation_prompt)
    sp = _llama3_special(tokenizer)
    blank = list(tokenizer.encode("\n\n"))

    def header(role: str) -> list[int]:
        return [sp[START_HEADER]] + list(tokenizer.encode(role)) + [sp[END_HEADER]] + blank

    ids = [sp[BEGIN_OF_TEXT]]
    for m in msgs:
        ids += header(m["role"]) + list(tokenizer.encode(m["content"].strip())) + [sp[EOT]]
    if add_generation_prompt:
        ids += header("assistant")
    return ids


# ------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------


def _style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"chat style must be one of {', '.join(STYLES)}, got {style!r}")
    return style


def chat_text(messages, style: str = "llama3", add_generation_prompt: bool = True) -> str:
    fn = llama3_chat_text if _style(style) == "llama3" else llama2_chat_text
    return fn(messages, add_generation_prompt)


def chat_ids(
    messages, tokenizer, style: str = "llama3", add_generation_prompt: bool = True
) -> list[int]:
    fn = llama3_chat_ids if _style(style) == "llama3" else llama2_chat_ids
    return fn(messages, tokenizer, add_generation_prompt)
