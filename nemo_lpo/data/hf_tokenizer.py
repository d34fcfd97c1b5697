"""A local Hugging Face tokenizer with a chat template: prompt ids (shared by the K responses) and response ids.

The prompt is the template rendered with ``add_generation_prompt=True``; the response is the rest of the
template rendered with the assistant turn appended, cut after its EOS (text the template puts after EOS, e.g.
a newline, is not trained on), with EOS appended when the template has none. Prompt and response text are
tokenised separately so that one prompt tokenisation serves all K responses. The template is the tokenizer's
own or one given with ``--chat-template`` (``chat_templates``), rendered by ``apply_chat_template`` either way.
"""

from __future__ import annotations

import os

import jinja2
import numpy as np
import transformers
from transformers import AutoTokenizer

from nemo_lpo.data.chat_templates import BUILTIN_TEMPLATES, TemplateError, resolve_chat_template
from nemo_lpo.data.examples import response_turns


class HFChatTokenizer:
    """A local Hugging Face tokenizer directory with its own ``chat_template`` or one given (``--chat-template``).

    Args:
        path: the tokenizer directory.
        chat_template: a built-in name (``chat_templates.BUILTIN_TEMPLATES``) or a Jinja file; it replaces the
            tokenizer's own template. None: the tokenizer's own, which must exist.
    """

    def __init__(self, path: str, chat_template: str | None = None) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # pack's worker processes are the parallelism
        self.path = os.fspath(path)
        self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        if chat_template is not None:
            self.template_source, self.template = resolve_chat_template(chat_template)
        elif getattr(self._tok, "chat_template", None):
            self.template_source, self.template = "tokenizer", self._tok.chat_template
        else:
            raise TemplateError(f"{self.path}: tokenizer has no chat_template; choose one with --chat-template "
                                f"NAME|FILE.jinja (built-ins: {', '.join(BUILTIN_TEMPLATES)})")
        if self._tok.eos_token_id is None:
            raise TemplateError(f"{self.path}: tokenizer has no eos token")
        self.vocab_size = len(self._tok)
        self.eos_id = int(self._tok.eos_token_id)
        self.bos_id = None if self._tok.bos_token_id is None else int(self._tok.bos_token_id)
        pad = self._tok.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_id)

    def identity(self) -> dict:
        """Describe the tokenizer for the manifest."""
        return {"name": self.path, "kind": "huggingface", "class": type(self._tok).__name__,
                "transformers_version": transformers.__version__, "template": self.template,
                "template_source": self.template_source,
                "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "pad_token": self._tok.convert_ids_to_tokens(self.pad_id)}

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self._tok.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as err:  # raise_exception() in the template: the list is refused, not the run
            raise TemplateError(f"the chat template refused the conversation: {err}") from None

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self._tok(texts, add_special_tokens=False)["input_ids"]]

    def _response_texts(self, messages: list[dict], responses: list[str]) -> tuple[str, list[str]]:
        prompt_text = self._render(messages, add_generation_prompt=True)
        suffixes = []
        for response in responses:
            full = self._render([*messages, *response_turns(response)], add_generation_prompt=False)
            if not full.startswith(prompt_text):
                raise TemplateError("the chat template does not render the prompt as a prefix of the conversation")
            suffix = full[len(prompt_text):]
            eos = self._tok.eos_token
            cut = suffix.rfind(eos)
            suffixes.append(suffix[:cut + len(eos)] if cut >= 0 else suffix + eos)
        return prompt_text, suffixes

    def encode_list(self, messages: list[dict], responses: list[str],
                    verify: bool = False) -> tuple[list[int], list[list[int]]]:
        """Return the prompt ids (with generation prompt) and each reply's ids as rendered after it, up to EOS.

        ``verify`` is accepted for symmetry with the Mistral tokenizer (the template is always the HF one).
        """
        prompt_text, suffixes = self._response_texts(messages, responses)
        ids = self._ids([prompt_text, *suffixes])
        for response_ids in ids[1:]:
            if not response_ids or response_ids[-1] != self.eos_id:
                raise TemplateError("the response does not tokenise to a sequence ending with EOS")
        return ids[0], ids[1:]

    def encode_lists(self, lists: list[tuple[list[dict], list[str]]], verify_first: bool = False) -> list:
        """``encode_list`` of many lists at once, as int32 arrays: one tokenizer call for all their texts.

        Returns:
            Per list, (prompt ids, [reply ids]) as int32 arrays, or the ValueError ``encode_list`` raises for it.
        """
        texts, plans = [], []
        for messages, responses in lists:
            try:
                prompt_text, suffixes = self._response_texts(messages, responses)
            except ValueError as err:
                plans.append(err)
                continue
            plans.append(len(texts))
            texts += [prompt_text, *suffixes]
        ids = self._tok(texts, add_special_tokens=False)["input_ids"] if texts else []
        out = []
        for plan, (_, responses) in zip(plans, lists, strict=True):
            if isinstance(plan, ValueError):
                out.append(plan)
                continue
            prompt, *replies = ids[plan:plan + 1 + len(responses)]
            if any(not r or r[-1] != self.eos_id for r in replies):
                out.append(TemplateError("the response does not tokenise to a sequence ending with EOS"))
                continue
            out.append((np.asarray(prompt, dtype=np.int32), [np.asarray(r, dtype=np.int32) for r in replies]))
        return out

    def decode(self, ids) -> str:
        """Text of ``ids`` with special tokens kept."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def templated_text(self, messages: list[dict], response: str) -> str:
        """The templated conversation up to the response's EOS (for round-trip checks)."""
        prompt_text, suffixes = self._response_texts(messages, [response])
        return prompt_text + suffixes[0]
