"""Prompt formats: the Alpaca-style template of the KD literature, chat templates, and plain
(the instruction is the whole prompt, as in TRL's prompt/completion data sets).

The Alpaca template is exactly the one in MiniLLM / DistiLLM / SRD data (the `prompt`
field of ../shared/data/dolly/*.jsonl); a test checks it against every row.
"""

from __future__ import annotations

from typing import Any

from srd.data.example import DataError, Example

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

PROMPT_FORMATS = ("alpaca", "chat", "plain")


def render_prompt(instruction: str, input_text: str, fmt: str, tokenizer: Any = None) -> str:
    """The prompt text for one example (no response)."""
    if fmt == "alpaca":
        if input_text:
            return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
        return ALPACA_NO_INPUT.format(instruction=instruction)
    if fmt == "plain":  # the text is the prompt as the model sees it (the input, if any, follows it)
        return f"{instruction}{input_text}"
    if fmt == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "prompt_format 'chat' needs a tokenizer with a chat template; use data.prompt_format=alpaca"
            )
        content = f"{instruction}\n\n{input_text}" if input_text else instruction
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    raise DataError(f"unknown prompt format {fmt!r}; choose one of {PROMPT_FORMATS}")


def _tokenize_prompt(tokenizer: Any, text: str, fmt: str) -> list[int]:
    # A chat template already writes its special tokens; the Alpaca prompt gets the
    # tokenizer's usual ones (a BOS for Llama-2-style tokenizers, nothing for GPT-2/SmolLM2);
    # a plain prompt too, unless it already starts with the BOS (a rendered chat template)
    bos = getattr(tokenizer, "bos_token", None)
    templated = fmt == "chat" or (fmt == "plain" and bool(bos) and text.startswith(bos))
    return tokenizer(text, add_special_tokens=not templated)["input_ids"]


def _shorten(tokenizer: Any, text: str, n_remove: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = max(0, len(ids) - n_remove)
    return tokenizer.decode(ids[:keep], skip_special_tokens=True)


def check_prompt_format(examples: list[Example], fmt: str, what: str) -> None:
    """Conversations (read from chat-message rows) are rendered by the chat template only: one
    line before any model loads, rather than a template that would flatten them."""
    if fmt != "chat":
        chat = next((ex for ex in examples if ex.meta.get("messages") is not None), None)
        if chat is not None:
            raise DataError(
                f"{what}: example {chat.id} is a conversation (chat messages), which only "
                f"data.prompt_format=chat renders (the tokenizer's chat template); this run uses {fmt!r}"
            )


def _encode_conversation(tokenizer: Any, ex: Example, max_prompt_len: int) -> list[int]:
    """A conversation's prompt through the chat template, ending with the generation prompt. Too
    long: the oldest turns go first (a leading system message stays), then the last message
    loses text from its end."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(f"example {ex.id} is a conversation: rendering it needs a tokenizer with a chat template")
    messages = [dict(m) for m in ex.meta["messages"]]

    def encode() -> list[int]:
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # the template's own checks (roles that must alternate, no system role, ...)
            raise DataError(
                f"example {ex.id}: the tokenizer's chat template refused the conversation ({' '.join(str(e).split())})"
            ) from None
        return _tokenize_prompt(tokenizer, text, "chat")

    ids = encode()
    for _ in range(len(messages) + 16):
        excess = len(ids) - max_prompt_len
        if excess <= 0:
            return ids
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first > 1:
            del messages[first]
            # whole turns: the prompt goes on with a user message, as chat templates expect
            while len(messages) - first > 1 and messages[first]["role"] != "user":
                del messages[first]
        elif messages[-1]["content"]:
            messages[-1]["content"] = _shorten(tokenizer, messages[-1]["content"], excess + 1)
        else:
            break
        ids = encode()
    if len(ids) <= max_prompt_len:
        return ids
    raise DataError(
        f"example {ex.id}: the chat template alone needs {len(ids)} tokens, more than "
        f"data.max_prompt_len={max_prompt_len}; raise data.max_prompt_len"
    )


def encode_prompt(tokenizer: Any, ex: Example, fmt: str, max_prompt_len: int) -> list[int]:
    """Token ids of the prompt, at most `max_prompt_len` long.

    Too-long prompts lose text from the end of the input (then of the instruction); the
    template, and in particular its `### Response:` tail, is always kept whole (the
    reference code cuts the tail off, so the model never sees where its answer starts).
    A conversation (ex.meta["messages"]) is rendered by the chat template (see
    _encode_conversation).
    """
    if ex.meta.get("messages") is not None:
        check_prompt_format([ex], fmt, "prompt")
        return _encode_conversation(tokenizer, ex, max_prompt_len)
    instruction, input_text = ex.instruction, ex.input
    ids = _tokenize_prompt(tokenizer, render_prompt(instruction, input_text, fmt, tokenizer), fmt)
    for _ in range(16):  # re-tokenising can move a token boundary; a few rounds always converge
        excess = len(ids) - max_prompt_len
        if excess <= 0:
            return ids
        if input_text:
            input_text = _shorten(tokenizer, input_text, excess + 1)
        elif instruction:
            instruction = _shorten(tokenizer, instruction, excess + 1)
        else:
            break
        ids = _tokenize_prompt(tokenizer, render_prompt(instruction, input_text, fmt, tokenizer), fmt)
    if len(ids) <= max_prompt_len:
        return ids
    raise DataError(
        f"example {ex.id}: the prompt template alone needs {len(ids)} tokens, more than "
        f"data.max_prompt_len={max_prompt_len}; raise data.max_prompt_len"
    )
