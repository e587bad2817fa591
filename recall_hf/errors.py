"""One-line reasons for errors raised by other libraries (transformers, huggingface_hub, safetensors, the OS)."""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty: what a one-line
    error of ours quotes as the reason."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
