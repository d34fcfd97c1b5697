"""Built-in chat templates for tokenizers that have none (base models): ``nemo-lpo pack --chat-template``.

Each is a Jinja template rendered by the tokenizer's own ``apply_chat_template(chat_template=...)``, the same
machinery as a tokenizer's own template: ``messages`` (role / content), ``bos_token``, ``eos_token`` and
``add_generation_prompt`` are what it sees. Hugging Face renders with ``trim_blocks``, so every newline is
written as a string expression. Every built-in begins with the tokenizer's BOS (empty when it has none):
that is what the models trained on these formats saw, their tokenizers adding it when the text is encoded.
A turn that ends without EOS gets EOS appended by the packer (``HFChatTokenizer``).
"""

from __future__ import annotations

import os

# Text of prompt turns, one paragraph each (system, user and assistant alike), then the response.
PLAIN = ("{{ bos_token }}{% for m in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}{{ m['content'] }}"
         "{% endfor %}{% if add_generation_prompt %}{{ '\\n\\n' }}{% endif %}")

# ChatML (OpenAI's markup; Qwen, OpenHermes): <|im_start|>ROLE\nTEXT<|im_end|>\n per turn.
CHATML = ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Zephyr (HuggingFaceH4/zephyr-7b-beta): <|ROLE|>\nTEXT</s>\n per turn.
ZEPHYR = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")

# Roles after an optional system message must alternate user / assistant / user ... (llama2, mistral).
_ALTERNATE = ("{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('conversation roles must alternate user/assistant/user/... after the system "
              "message') }}{% endif %}")
_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
           "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}")

# Llama-2-chat: <s>[INST] <<SYS>>\nSYSTEM\n<</SYS>>\n\nUSER [/INST] ASSISTANT </s><s>[INST] USER [/INST] ...
LLAMA2 = (_SYSTEM + "{% for m in turns %}" + _ALTERNATE
          + "{% if m['role'] == 'user' %}{% set text = m['content'].strip() %}"
            "{% if loop.first and system %}{% set text = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + text %}{% endif %}"
            "{{ bos_token + '[INST] ' + text + ' [/INST]' }}"
            "{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

# Mistral instruct, as `--tokenizer mistral` writes it: <s>[INST] SYSTEM\n\nUSER [/INST] ASSISTANT</s>[INST] ...
MISTRAL = ("{{ bos_token }}" + _SYSTEM + "{% for m in turns %}" + _ALTERNATE
           + "{% if m['role'] == 'user' %}{% set text = m['content'] %}"
             "{% if loop.first and system %}{% set text = system + '\\n\\n' + text %}{% endif %}"
             "{{ '[INST] ' + text + ' [/INST]' }}"
             "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")

BUILTIN_TEMPLATES = {"plain": PLAIN, "chatml": CHATML, "zephyr": ZEPHYR, "llama2": LLAMA2, "mistral": MISTRAL}


class TemplateError(ValueError):
    """The chat template cannot split a conversation into prompt and response, or there is no template."""


def resolve_chat_template(spec: str) -> tuple[str, str]:
    """The ``(source, Jinja text)`` of ``--chat-template NAME|FILE.jinja``; source is ``builtin:NAME`` or the file.

    Raises:
        TemplateError: neither a built-in name nor a readable file.
    """
    if spec in BUILTIN_TEMPLATES:
        return f"builtin:{spec}", BUILTIN_TEMPLATES[spec]
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            return os.fspath(spec), f.read()
    raise TemplateError(f"--chat-template {spec!r}: not a built-in ({', '.join(BUILTIN_TEMPLATES)}) and not a file")
