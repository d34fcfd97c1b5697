"""Chat templates + tokenisation: prompt ids (shared by the K responses) and response ids (EOS appended).

``--tokenizer mistral``: the real Mistral-7B / Mixtral-8x7B v1 tokenizer from ``mistral-common`` with its
instruct format. The prompt is mistral-common's encoding of the chat-completion request (``<s>[INST] ... [/INST]``);
a response is ``encode(text) + [EOS]``, which is exactly how mistral-common encodes a final assistant turn, so
``prompt_ids + response_ids`` equals the tokenisation of the whole conversation (tested).

``--tokenizer PATH``: a local Hugging Face tokenizer with its own ``chat_template`` or the one given by
``--chat-template`` (``hf_tokenizer.HFChatTokenizer``).
"""

from __future__ import annotations

import functools
import os

import mistral_common
import numpy as np
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from sentencepiece import SentencePieceProcessor

from nemo_lpo.data.chat_templates import TemplateError
from nemo_lpo.data.examples import response_turns
from nemo_lpo.data.hf_tokenizer import HFChatTokenizer

__all__ = ["HFChatTokenizer", "MistralChatTokenizer", "TemplateError", "load_tokenizer"]

MISTRAL = "mistral"
_ENCODED = object()  # marks a list of ``encode_lists`` already encoded on its own


class MistralChatTokenizer:
    """The Mistral v1 tokenizer (sentencepiece, 32000 pieces) with the Mistral instruct format."""

    def __init__(self) -> None:
        self._mistral = MistralTokenizer.v1()
        self._raw = self._mistral.instruct_tokenizer.tokenizer
        # The same model file, for sentencepiece's batched encode straight to int32 arrays (one call per chunk
        # of lists instead of one per text, and no Python int per token); single-threaded: pack's workers
        # are the parallelism.
        self._sp = SentencePieceProcessor(model_file=str(self._raw.file_path), num_threads=1)
        self.vocab_size = int(self._raw.n_words)
        self.bos_id = int(self._raw.bos_id)
        self.eos_id = int(self._raw.eos_id)
        self.pad_id = int(self._raw.unk_id)  # Mistral has no pad token; padded positions are masked anyway

    def identity(self) -> dict:
        """Describe the tokenizer for the manifest."""
        return {"name": MISTRAL, "kind": "mistral-common", "version": mistral_common.__version__,
                "model": "tokenizer.model.v1", "template": "mistral-instruct-v1", "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id, "pad_token": "<unk>"}

    @staticmethod
    def _messages(messages: list[dict]):
        classes = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
        try:
            return [classes[m["role"]](content=m["content"]) for m in messages]
        except KeyError as err:
            raise TemplateError(f"unknown chat role {err.args[0]!r}") from None

    def encode_prompt_library(self, messages: list[dict]) -> list[int]:
        """Token ids of the prompt from mistral-common's own request validation + encoding (the reference)."""
        try:
            request = ChatCompletionRequest(messages=self._messages(messages))
            return list(self._mistral.encode_chat_completion(request).tokens)
        except MistralCommonException as err:
            raise TemplateError(f"mistral-common rejected the prompt: {err}") from None

    def _prompt_segments(self, messages: list[dict]) -> list[tuple[str, bool]] | None:
        """The texts a plain conversation's prompt encodes after BOS, each with whether EOS follows it.

        Plain: optional leading system messages, then user / assistant turns alternating from a user turn to
        a user turn, no empty content. None for anything else (the library validates and encodes those).
        """
        system = [m["content"] for m in messages if m["role"] == "system"]
        turns = messages[len(system):]
        plain = (turns and len(turns) % 2 == 1 and all(m.get("content") for m in messages)
                 and all(m["role"] == ("user", "assistant")[i % 2] for i, m in enumerate(turns)))
        if not plain:
            return None
        system_prompt = "\n\n".join(system)
        segments = []
        for i, m in enumerate(turns):
            if m["role"] == "user":
                content = f"{system_prompt}\n\n{m['content']}" if i == 0 and system_prompt else m["content"]
                segments.append((f"[INST] {content} [/INST]", False))
            else:
                segments.append((m["content"], True))
        return segments

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of the prompt (BOS, the turns, up to and including the last ``[/INST]``).

        Plain conversations (``_prompt_segments``) are encoded directly the way mistral-common's v1 instruct
        tokenizer does (it costs as much as tokenising the text itself; the library's pydantic validation
        would double the cost of short prompts); anything else goes through the library, which validates
        it. Equality with the library is tested, and ``pack`` re-checks one list per chunk.
        """
        segments = self._prompt_segments(messages)
        if segments is None:
            return self.encode_prompt_library(messages)
        tokens = [self.bos_id]
        for text, eos in segments:
            tokens += self._raw.encode(text, bos=False, eos=eos)
        return tokens

    def encode_list(self, messages: list[dict], responses: list[str],
                    verify: bool = False) -> tuple[list[int], list[list[int]]]:
        """Return the prompt ids and, per assistant reply, its ids followed by EOS.

        Args:
            messages: the prompt turns.
            responses: the K replies.
            verify: also encode the prompt with the library and raise TemplateError if they differ.
        """
        prompt = self.encode_prompt(messages)
        if verify and prompt != self.encode_prompt_library(messages):
            raise TemplateError("the direct Mistral v1 prompt encoding differs from mistral-common's")
        return prompt, [self.encode_response(response) for response in responses]

    def encode_response(self, response: str | list[dict]) -> list[int]:
        """Ids of a reply: each assistant turn ``encode(text) + [EOS]``, each user turn ``[INST] text [/INST]``.

        A multi-turn reply (HH-RLHF transcripts that part before their last reply) continues the conversation
        exactly as mistral-common encodes the same turns inside a prompt.
        """
        ids = []
        for turn in response_turns(response):
            if turn["role"] == "assistant":
                ids += self._raw.encode(turn["content"], bos=False, eos=False) + [self.eos_id]
            elif turn["role"] == "user":
                ids += self._raw.encode(f"[INST] {turn['content']} [/INST]", bos=False, eos=False)
            else:
                raise TemplateError(f"a reply turn has role {turn['role']!r} (assistant or user)")
        return ids

    def encode_lists(self, lists: list[tuple[list[dict], list[str]]], verify_first: bool = False) -> list:
        """``encode_list`` of many lists at once, as int32 arrays: two sentencepiece calls for all their texts.

        Args:
            lists: (prompt messages, K replies) per list.
            verify_first: check the first list's prompt against the library's own encoding.

        Returns:
            Per list, (prompt ids, [reply ids + EOS]) as int32 arrays, or the ValueError (TemplateError, or
            the library's validation error) that ``encode_list`` raises for it.
        """
        texts = ([], [])  # (no EOS after it, EOS after it)
        plans = []
        for n, (messages, responses) in enumerate(lists):
            try:
                if not all(isinstance(r, str) for r in responses):  # multi-turn replies (rare): one at a time
                    prompt, replies = self.encode_list(messages, responses, verify=n == 0 and verify_first)
                    plans.append((_ENCODED, (np.asarray(prompt, dtype=np.int32),
                                           [np.asarray(r, dtype=np.int32) for r in replies])))
                    continue
                segments = self._prompt_segments(messages)
                if segments is None or (n == 0 and verify_first):
                    prompt = np.asarray(self.encode_prompt(messages), dtype=np.int32)
                    if n == 0 and verify_first and prompt.tolist() != self.encode_prompt_library(messages):
                        raise TemplateError("the direct Mistral v1 prompt encoding differs from mistral-common's")
                else:
                    prompt = []  # where each segment's ids will be: (EOS after it, index in that batch)
                    for text, eos in segments:
                        prompt.append((eos, len(texts[eos])))
                        texts[eos].append(text)
            except ValueError as err:
                plans.append(err)
                continue
            plans.append((prompt, len(texts[True])))
            texts[True].extend(responses)
        ids = [self._sp.Encode(t, add_bos=False, add_eos=eos, return_type="numpy") if t else []
               for eos, t in enumerate(texts)]
        bos = np.array([self.bos_id], dtype=np.int32)
        out = []
        for plan, (_, responses) in zip(plans, lists, strict=True):
            if isinstance(plan, ValueError):
                out.append(plan)
                continue
            if plan[0] is _ENCODED:
                out.append(plan[1])
                continue
            prompt, first = plan
            if isinstance(prompt, list):
                prompt = np.concatenate([bos, *(ids[eos][i] for eos, i in prompt)])
            out.append((prompt, ids[True][first:first + len(responses)]))
        return out

    def encode_conversation(self, messages: list[dict], response: str | list[dict]) -> list[int]:
        """Token ids of the whole conversation as mistral-common encodes it for fine-tuning (for checks)."""
        tokenizer = MistralTokenizer.v1()
        tokenizer._chat_completion_request_validator._mode = ValidationMode.finetuning
        request = ChatCompletionRequest(messages=self._messages([*messages, *response_turns(response)]))
        return list(tokenizer.encode_chat_completion(request).tokens)

    def decode(self, ids) -> str:
        """Text of ``ids``; BOS / EOS / UNK shown as ``<s>`` / ``</s>`` / ``<unk>``, text between them decoded."""
        specials = {self.bos_id: "<s>", self.eos_id: "</s>", self.pad_id: "<unk>"}
        parts, run = [], []
        for i in ids:
            i = int(i)
            if i in specials:
                parts += [self._raw.decode(run), specials[i]] if run else [specials[i]]
                run = []
            else:
                run.append(i)
        if run:
            parts.append(self._raw.decode(run))
        return "".join(parts)

    @staticmethod
    def templated_text(messages: list[dict], response: str | list[dict]) -> str:
        """The Mistral v1 instruct format written out as text (what the packed ids must decode to).

        ``<s>[INST] {user} [/INST] {assistant}</s>[INST] {user} [/INST] {response}</s>``; a system message is
        put before the first user message, separated by a blank line.
        """
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        text, first = "<s>", True
        for m in messages:
            if m["role"] == "user":
                content = f"{system}\n\n{m['content']}" if first and system else m["content"]
                text += f"[INST] {content} [/INST]"
                first = False
            elif m["role"] == "assistant":
                text += f" {m['content']}</s>"
        for turn in response_turns(response):
            text += f" {turn['content']}</s>" if turn["role"] == "assistant" else f"[INST] {turn['content']} [/INST]"
        return text


@functools.lru_cache(maxsize=4)
def load_tokenizer(spec: str, chat_template: str | None = None):
    """Return the chat tokenizer named by ``--tokenizer``: ``mistral`` or a local HF tokenizer directory.

    Cached per process (the tokenizers are only read), so repeated packs do not reload them.

    Args:
        spec: ``mistral`` or a local HF tokenizer directory.
        chat_template: ``--chat-template`` (a built-in name or a Jinja file) for an HF tokenizer; None: its own.

    Raises:
        FileNotFoundError: ``spec`` is neither ``mistral`` nor an existing directory.
        TemplateError: a chat template given with ``mistral`` (its instruct format is mistral-common's), an
            unknown template, or an HF tokenizer with neither its own template nor one given.
    """
    if spec == MISTRAL:
        if chat_template is not None:
            raise TemplateError("--chat-template applies to a Hugging Face tokenizer directory; --tokenizer mistral "
                                "uses mistral-common's instruct format (the built-in 'mistral' template renders it "
                                "for other tokenizers)")
        return MistralChatTokenizer()
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"--tokenizer {spec!r}: not 'mistral' and not a local tokenizer directory")
    return HFChatTokenizer(spec, chat_template)
