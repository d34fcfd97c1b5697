"""Quiet start: the listed harmless warnings are hidden, any other still shows, --verbose / NEMO_LPO_VERBOSE show all.

Each case runs in a fresh interpreter (warning filters and logger filters are process-wide). The messages are
emitted as their sources emit them: ``warnings.warn_explicit`` with the module megatron / torch warn from, and
a log record on the logger they log to.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_lpo.quiet import HARMLESS

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "data" / "listwise_messages.jsonl"

EMIT = r"""
import logging, sys, warnings
from nemo_lpo import quiet
quiet.install(verbose="--verbose" in sys.argv)
def warn(message, module, category=UserWarning):
    warnings.warn_explicit(message, category, module.replace(".", "/") + ".py", 1, module=module)
warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", "megatron.core.optimizer")
warn("Please use DTensor instead and we are deprecating ShardedTensor.", "torch.distributed.checkpoint.default_planner",
     FutureWarning)
logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
logging.getLogger("megatron.core.models.gpt.gpt_model").warning("GPTModel IS DEPRECATED. GPTModel is only ...")
# not listed: the same sources with another message, a listed message from another module
warn("Something new went wrong in the optimizer", "megatron.core.optimizer")
warn("Transformer Engine and Apex are not installed (said by someone else)", "mypackage.module")
logging.getLogger("megatron.core.models.gpt.gpt_model").warning("an unknown megatron warning")
"""
HIDDEN = ["Transformer Engine and Apex are not installed. Falling back", "deprecating ShardedTensor",
          "No CUDA runtime is found", "GPTModel IS DEPRECATED"]
SHOWN = ["Something new went wrong in the optimizer", "(said by someone else)", "an unknown megatron warning"]


def run(args, env_extra=None, code=EMIT):
    env = {k: v for k, v in os.environ.items() if k != "NEMO_LPO_VERBOSE"} | (env_extra or {})
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          check=True).stderr


def test_harmless_hidden_others_shown():
    err = run([])
    assert [m for m in HIDDEN if m in err] == []
    assert [m for m in SHOWN if m in err] == SHOWN


@pytest.mark.parametrize(("args", "env"), [(["--verbose"], {}), ([], {"NEMO_LPO_VERBOSE": "1"})])
def test_verbose_shows_all(args, env):
    err = run(args, env)
    assert [m for m in HIDDEN + SHOWN if m in err] == HIDDEN + SHOWN


def test_every_entry_says_why_and_compiles():
    for item in HARMLESS:
        re.compile(item.source), re.compile(item.message)
        assert len(item.why) > 30, item


def test_pack_starts_quietly_and_verbose_brings_the_warnings_back(tmp_path):
    """The real thing: `nemo-lpo pack` imports megatron (IndexedDataset), which warns about TE / Apex on CPU."""
    cmd = "from nemo_lpo.cli import main; import sys; sys.exit(main(sys.argv[1:]))"
    pack = ["pack", "--input", str(FIXTURE), "--no-progress"]
    quiet = run([*pack, "--output-prefix", str(tmp_path / "a")], code=cmd)
    loud = run(["--verbose", *pack, "--output-prefix", str(tmp_path / "b")], code=cmd)
    assert "Transformer Engine and Apex are not installed" in loud  # megatron still warns here: a real check
    assert "Warning" not in quiet and "No CUDA runtime" not in quiet
    assert quiet.splitlines()[-1].startswith("wrote 3 lists")
