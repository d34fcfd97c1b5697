"""HF -> megatron -> HF on tiny random models of each architecture: exact weights, logits parity, bad input.

Runs megatron in this process (a one-rank gloo world at TP=PP=EP=1, as the converters do).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, MixtralConfig

from nemo_lpo.cli import main as cli_main
from nemo_lpo.convert.hf_config import ConversionError
from nemo_lpo.convert.hf_io import HFCheckpointReader
from nemo_lpo.convert.hf_to_mcore import convert_hf_to_mcore
from nemo_lpo.convert.mcore_to_hf import convert_mcore_to_hf
from nemo_lpo.io import SIDECAR_NAME
from nemo_lpo.model.sidecar import read_checkpoint_preset

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
ARCHS = {
    "MixtralForCausalLM": (MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2,
                                               rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "MistralForCausalLM": (MistralConfig, dict(sliding_window=None)),
    "LlamaForCausalLM": (LlamaConfig, {}),
}


def make_hf_model(path: Path, arch: str, seed: int = 0, max_shard_size: str = "60KB", **overrides) -> Path:
    """Save a tiny random ``arch`` model (norms perturbed too) in several safetensors shards."""
    cls, extra = ARCHS[arch]
    config = cls(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    model.save_pretrained(str(path), max_shard_size=max_shard_size)
    return path


def hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    reader = HFCheckpointReader(path)
    return {name: reader.get(name) for name in sorted(reader.shapes)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{arch: (hf dir, checkpoint dir, exported dir)} for each architecture."""
    out = {}
    for arch in ARCHS:
        root = tmp_path_factory.mktemp(arch)
        hf = make_hf_model(root / "hf", arch)
        convert_hf_to_mcore(hf, root / "ckpt")
        convert_mcore_to_hf(root / "ckpt", root / "export", max_shard_bytes=100_000)
        out[arch] = (hf, root / "ckpt", root / "export")
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_hf_mcore_hf_is_bit_identical(converted, arch):
    hf, _, export = converted[arch]
    original, back = hf_tensors(hf), hf_tensors(export)
    assert list(original) == list(back)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype, name
        assert torch.equal(back[name], tensor), name
    assert len(list(export.glob("model-*-of-*.safetensors"))) > 1  # sharded output with an index
    index = json.loads((export / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == [arch]
    assert (export / "generation_config.json").is_file()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_megatron_logits_match_hf(converted, arch):
    from nemo_lpo.convert.verify import hf_logits, load_megatron_model, megatron_logits

    hf, ckpt, export = converted[arch]
    model, preset = load_megatron_model(ckpt)
    tokens = torch.randint(0, preset.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    reference = hf_logits(hf, tokens)
    ours = megatron_logits(model, tokens)
    assert ours.shape == reference.shape
    diff = (ours - reference).abs().max().item()
    assert diff < 1e-5, f"{arch}: max |logit diff| {diff}"
    assert reference.abs().max() > 0.1  # the comparison is not between two near-zero outputs
    # the export loads in transformers and gives the original logits
    assert torch.equal(hf_logits(export, tokens), reference)


def test_checkpoint_layout_and_recorded_preset(converted):
    hf, ckpt, _ = converted["MixtralForCausalLM"]
    assert json.loads((ckpt / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert (ckpt / ".metadata").is_file() and list(ckpt.glob("*.distcp"))
    assert (ckpt / "hf" / "config.json").is_file()
    preset = read_checkpoint_preset(ckpt)
    assert (preset.num_experts, preset.num_layers, preset.vocab_size) == (4, 2, 256)
    assert json.loads((ckpt / SIDECAR_NAME).read_text())["architecture"] == "MixtralForCausalLM"


def test_bf16_import_then_export_matches_cast_weights(converted, tmp_path):
    hf, _, _ = converted["MistralForCausalLM"]
    convert_hf_to_mcore(hf, tmp_path / "ckpt", dtype="bf16")
    convert_mcore_to_hf(tmp_path / "ckpt", tmp_path / "export")
    back = hf_tensors(tmp_path / "export")
    for name, tensor in hf_tensors(hf).items():
        assert back[name].dtype == torch.bfloat16
        assert torch.equal(back[name], tensor.to(torch.bfloat16)), name


def test_export_with_tokenizer_and_config_from(converted, tmp_path):
    hf, ckpt, _ = converted["LlamaForCausalLM"]
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    summary = convert_mcore_to_hf(ckpt, tmp_path / "out", hf_config_from=hf, tokenizer=tok)
    assert summary["tokenizer_files"] == ["tokenizer_config.json"]
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"model_max_length": 128}'


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_get_the_usual_permissions(converted, tmp_path, umask):
    import os
    import stat

    _, ckpt, _ = converted["MixtralForCausalLM"]
    old = os.umask(umask)
    try:
        convert_mcore_to_hf(ckpt, tmp_path / "export", max_shard_bytes=100_000)
    finally:
        os.umask(old)
    files = sorted((tmp_path / "export").iterdir())
    assert len([f for f in files if f.suffix == ".safetensors"]) > 1
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files}
    assert modes == {f.name: 0o666 & ~umask for f in files}  # shards as config.json: not safetensors' 0600
    assert stat.S_IMODE((tmp_path / "export").stat().st_mode) == 0o777 & ~umask
    assert not [p for p in (tmp_path / "export").iterdir() if p.name.startswith(".")]  # no probe left behind


def _assert_nothing_written(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_missing_shard_is_refused_before_writing(converted, tmp_path):
    hf = shutil.copytree(converted["MixtralForCausalLM"][0], tmp_path / "hf")
    victim = sorted(hf.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ConversionError, match=f"shard file.*missing.*{victim.name}"):
        convert_hf_to_mcore(hf, tmp_path / "ckpt")
    _assert_nothing_written(tmp_path / "ckpt")


def test_config_that_does_not_match_weights_is_refused(converted, tmp_path):
    hf = shutil.copytree(converted["MistralForCausalLM"][0], tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["intermediate_size"] = 128
    (hf / "config.json").write_text(json.dumps(config))
    expected = r"does not match the weights: model.layers.0.mlp.gate_proj.weight in .*has shape \(96, 64\), the config"
    with pytest.raises(ConversionError, match=expected + r" implies \(128, 64\)"):
        convert_hf_to_mcore(hf, tmp_path / "ckpt")
    config["intermediate_size"], config["num_hidden_layers"] = 96, 3
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="tensor\\(s\\) missing, e.g. \\['model.layers.2"):
        convert_hf_to_mcore(hf, tmp_path / "ckpt")
    _assert_nothing_written(tmp_path / "ckpt")


def test_export_with_mismatched_config_is_refused(converted, tmp_path):
    _, ckpt, _ = converted["MixtralForCausalLM"]
    other = make_hf_model(tmp_path / "other", "MixtralForCausalLM", num_local_experts=2)
    with pytest.raises(ConversionError, match="does not match the checkpoint"):
        convert_mcore_to_hf(ckpt, tmp_path / "out", hf_config_from=other)
    _assert_nothing_written(tmp_path / "out")


def test_existing_output_and_bad_layout_are_refused(converted, tmp_path):
    hf, ckpt, _ = converted["MixtralForCausalLM"]
    with pytest.raises(ConversionError, match="already exists"):
        convert_hf_to_mcore(hf, ckpt)
    with pytest.raises(ConversionError, match="num_experts 4 is not divisible by ep=3"):
        convert_hf_to_mcore(hf, tmp_path / "ckpt", ep=3)
    with pytest.raises(ConversionError, match="no tokenizer files"):
        convert_mcore_to_hf(ckpt, tmp_path / "out", tokenizer=tmp_path)
    _assert_nothing_written(tmp_path / "ckpt")


def test_cli_reports_errors_and_converts(converted, tmp_path, capsys):
    hf, _, _ = converted["LlamaForCausalLM"]
    assert cli_main(["convert", "hf-to-mcore", "--hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c")]) == 2
    assert "nowhere/config.json: not found" in capsys.readouterr().err
    assert cli_main(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "c"), "--tp", "2"]) == 0
    assert cli_main(["convert", "mcore-to-hf", "--ckpt", str(tmp_path / "c"), "--out", str(tmp_path / "h")]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert torch.equal(hf_tensors(tmp_path / "h")["lm_head.weight"], hf_tensors(hf)["lm_head.weight"])


def test_sliding_window_shorter_than_training_sequence_is_refused(tmp_path):
    hf = make_hf_model(tmp_path / "hf", "MistralForCausalLM", sliding_window=32)
    with pytest.raises(ConversionError, match="sliding_window' = 32 is shorter than the sequence length 64"):
        convert_hf_to_mcore(hf, tmp_path / "ckpt", seq_length=64)
    _assert_nothing_written(tmp_path / "ckpt")
    convert_hf_to_mcore(hf, tmp_path / "ckpt", seq_length=32)
    assert read_checkpoint_preset(tmp_path / "ckpt").sliding_window == 32
    convert_mcore_to_hf(tmp_path / "ckpt", tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["sliding_window"] == 32
