"""``nemo-lpo convert hf-to-mcore | mcore-to-hf``; cheap to import (torch / megatron load inside the commands)."""

from __future__ import annotations

import argparse
import sys


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _hf_to_mcore(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nemo_lpo.convert.hf_to_mcore import convert_hf_to_mcore
    from nemo_lpo.model.sidecar import ModelDescriptionError

    if (Path(args.hf) / "metadata.json").is_file():  # the other direction's input, a common mix-up
        print(f"nemo-lpo convert hf-to-mcore: error: --hf={args.hf}: is a megatron dist checkpoint, not a Hugging "
              "Face model; use it as model.init_checkpoint as it is, or export it with `nemo-lpo convert "
              "mcore-to-hf --ckpt`", file=sys.stderr)
        return 2
    try:
        summary = convert_hf_to_mcore(args.hf, args.out, tp=args.tp, pp=args.pp, ep=args.ep, dtype=args.dtype,
                                      seq_length=args.seq_length)
    except ModelDescriptionError as err:
        print(f"nemo-lpo convert hf-to-mcore: error: {err}", file=sys.stderr)
        return 2
    preset = summary["preset"]
    print(f"wrote {summary['out']}: {summary['architecture']} ({preset.num_layers} layers, "
          f"{preset.num_experts or 'no'} experts), {summary['parameters']} parameters, {summary['dtype']}; "
          f"loadable at any TP/PP/EP (validated for tp={args.tp} pp={args.pp} ep={args.ep})")
    return 0


def _mcore_to_hf(args: argparse.Namespace) -> int:
    from nemo_lpo.config import ConfigError
    from nemo_lpo.convert.mcore_to_hf import convert_mcore_to_hf
    from nemo_lpo.model.sidecar import ModelDescriptionError
    from nemo_lpo.train.preflight import check_dist_checkpoint

    try:
        check_dist_checkpoint(args.ckpt, "--ckpt")  # a folder that is not a (complete) checkpoint: one line
    except ConfigError as err:
        print(f"nemo-lpo convert mcore-to-hf: error: {err}", file=sys.stderr)
        return 2
    try:
        summary = convert_mcore_to_hf(args.ckpt, args.out, hf_config_from=args.hf_config_from,
                                      tokenizer=args.tokenizer, preset_name=args.preset, dtype=args.dtype,
                                      max_shard_bytes=int(args.max_shard_size_gb * 2**30),
                                      adapters_out=args.adapters_out)
    except ModelDescriptionError as err:
        print(f"nemo-lpo convert mcore-to-hf: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {summary['out']}: {summary['architecture']}, {len(summary['shards'])} safetensors shard(s), "
          f"{summary['dtype']}, tokenizer files: {summary['tokenizer_files'] or 'none'}"
          + (", chat template of the packed data" if summary.get("chat_template") else "")
          + (f"; adapters merged from {summary['merged_adapters']}" if summary.get("merged_adapters") else ""))
    if summary.get("adapters"):
        print(f"wrote {summary['adapters']['out']}: PEFT adapters for {summary['adapters']['target_modules']}")
    return 0


def register(subparsers) -> None:
    """Add ``convert`` with its ``hf-to-mcore`` and ``mcore-to-hf`` sub-commands."""
    convert = subparsers.add_parser("convert", help="convert checkpoints between HF and megatron",
                                    description="Convert Mixtral / Mistral / Llama checkpoints between HF "
                                                "safetensors and megatron dist checkpoints.")
    sub = convert.add_subparsers(dest="convert_command", metavar="DIRECTION", required=True)

    to_mcore = sub.add_parser("hf-to-mcore", help="HF safetensors -> megatron dist checkpoint (streaming)")
    to_mcore.add_argument("--hf", required=True, help="HF model directory (config.json + *.safetensors)")
    to_mcore.add_argument("--out", required=True, help="checkpoint directory to create")
    to_mcore.add_argument("--tp", type=_positive, default=1, help="tensor-parallel size to validate for")
    to_mcore.add_argument("--pp", type=_positive, default=1, help="pipeline-parallel size to validate for")
    to_mcore.add_argument("--ep", type=_positive, default=1, help="expert-parallel size to validate for")
    to_mcore.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                          help="parameter dtype (default: fp32 if the HF weights are fp32, else bf16)")
    to_mcore.add_argument("--seq-length", type=_positive, default=None,
                          help="training sequence length: refused if longer than the model's sliding window")
    to_mcore.set_defaults(func=_hf_to_mcore)

    to_hf = sub.add_parser("mcore-to-hf", help="megatron dist checkpoint -> HF safetensors")
    to_hf.add_argument("--ckpt", required=True, help="megatron dist checkpoint directory")
    to_hf.add_argument("--out", required=True, help="HF model directory to create")
    to_hf.add_argument("--hf-config-from", default=None,
                       help="HF model directory whose config.json describes the model (default: the "
                            "description stored with the checkpoint)")
    to_hf.add_argument("--tokenizer", default=None, help="directory whose tokenizer files are copied")
    to_hf.add_argument("--preset", default=None, help="model preset name, for checkpoints without a description")
    to_hf.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                       help="output dtype (default: the checkpoint's, so the export is exact)")
    to_hf.add_argument("--adapters-out", default=None,
                       help="adapter checkpoints (peft lora/dora): also write the adapters alone in Hugging Face "
                            "PEFT format here (adapter_config.json + adapter_model.safetensors; needs `peft`)")
    to_hf.add_argument("--max-shard-size-gb", type=float, default=5.0, help="safetensors shard size in GiB")
    to_hf.set_defaults(func=_mcore_to_hf)
