#!/usr/bin/env python3
r"""Megatron-LM's ``tools/checkpoint/convert.py`` habit: the same as ``nemo-lpo convert``.

    python tools/checkpoint/convert.py --model-type GPT --loader mixtral_hf --saver mcore \\
        --load-dir HF_DIR --save-dir CKPT --target-tensor-parallel-size 1 --target-pipeline-parallel-size 4 \\
        --target-expert-parallel-size 8
    python tools/checkpoint/convert.py --model-type GPT --loader mcore --saver hf --load-dir CKPT --save-dir HF_OUT

An HF loader (``hf``, ``llama_mistral``, ``mixtral_hf``) with the ``mcore`` saver runs ``nemo-lpo convert
hf-to-mcore``; the ``mcore`` loader with an HF saver runs ``nemo-lpo convert mcore-to-hf``. A megatron dist
checkpoint loads under any TP/PP/EP, so the ``--target-*`` sizes are the layout it is validated for, not a
resharding. ``--params-dtype`` (bf16 / fp32) and, for the export, ``--tokenizer-dir`` pass through.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from nemo_lpo.cli import main  # noqa: E402

HF_FORMATS = ("hf", "llama_mistral", "mixtral_hf")


def parser() -> argparse.ArgumentParser:
    """Megatron-LM's flags for the conversions nemo-lpo has."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-type", default="GPT", choices=("GPT",), help="only GPT models (Mixtral, Mistral, Llama)")
    p.add_argument("--loader", required=True, choices=(*HF_FORMATS, "mcore"), help="format of --load-dir")
    p.add_argument("--saver", required=True, choices=(*HF_FORMATS, "mcore"), help="format of --save-dir")
    p.add_argument("--load-dir", required=True)
    p.add_argument("--save-dir", required=True)
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--target-expert-parallel-size", type=int, default=1)
    p.add_argument("--params-dtype", choices=("bf16", "fp32"), default=None)
    p.add_argument("--tokenizer-dir", default=None, help="mcore -> HF: directory whose tokenizer files are copied")
    return p


def translate(argv: list[str]) -> list[str]:
    """``nemo-lpo convert`` arguments from Megatron-LM style ones (exits 2 on a conversion nemo-lpo lacks)."""
    p = parser()
    args = p.parse_args(argv)
    dtype = ["--dtype", args.params_dtype] if args.params_dtype else []
    if args.loader in HF_FORMATS and args.saver == "mcore":
        return ["convert", "hf-to-mcore", "--hf", args.load_dir, "--out", args.save_dir,
                "--tp", str(args.target_tensor_parallel_size), "--pp", str(args.target_pipeline_parallel_size),
                "--ep", str(args.target_expert_parallel_size), *dtype]
    if args.loader == "mcore" and args.saver in HF_FORMATS:
        tokenizer = ["--tokenizer", args.tokenizer_dir] if args.tokenizer_dir else []
        return ["convert", "mcore-to-hf", "--ckpt", args.load_dir, "--out", args.save_dir, *dtype, *tokenizer]
    p.error(f"--loader {args.loader} --saver {args.saver}: nemo-lpo converts HF <-> mcore only "
            "(a dist checkpoint needs no mcore -> mcore resharding: it loads under any TP/PP/EP)")
    return []  # not reached: p.error exits


if __name__ == "__main__":
    sys.exit(main(translate(sys.argv[1:])))
