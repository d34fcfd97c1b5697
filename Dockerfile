# nemo-lpo on an NGC PyTorch container (it carries CUDA, cuDNN, NCCL, Transformer Engine and Apex).
#
#   docker build -t nemo-lpo:0.1.0 .                                   # or: --build-arg BASE_IMAGE=...
#   enroot import -o nemo-lpo.sqsh dockerd://nemo-lpo:0.1.0            # for pyxis (srun --container-image)
#
# The image's own CUDA builds are kept: torch, triton, numpy, Transformer Engine and Apex are frozen
# by a pip constraints file, so installing this package never replaces them (a conflict fails the build
# instead). Everything else (megatron-core among them) is the tested version of constraints.txt. Pick the
# NGC release whose PyTorch matches constraints.txt's torch; its Python must be 3.12. (NeMo Framework image
# with Megatron-Bridge: Dockerfile.nemo.)
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.10-py3
FROM ${BASE_IMAGE}

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /workspace/nemo-lpo

# 1. Freeze what the image brings; fail early on a Python this package does not support.
RUN python -c 'import sys; assert sys.version_info[:2] == (3, 12), f"nemo-lpo needs Python 3.12, image has {sys.version}"' \
    && python -m pip list --format=freeze \
       | grep -iE '^(torch|triton|pytorch-triton|numpy|transformer[-_]engine[-_a-z0-9]*|apex|nvidia-modelopt)==' \
       > /opt/nemo-lpo-image-constraints.txt \
    && grep -iq '^torch==' /opt/nemo-lpo-image-constraints.txt \
    && cat /opt/nemo-lpo-image-constraints.txt

# 2. The dependencies except those the image provides, at their tested versions (constraints.txt without the
#    image's torch / triton / numpy / CUDA wheels); cached as a layer.
COPY pyproject.toml README.md constraints.txt ./
RUN python -c 'import re, tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; \
print("\n".join(d for d in deps if re.split(r"[<>=\[ ]", d)[0].lower() not in {"torch", "triton", "numpy"}))' \
       > /opt/nemo-lpo-requirements.txt \
    && grep -viE '^(torch|triton|numpy|nvidia[-_]|cuda[-_])' constraints.txt > /opt/nemo-lpo-tested.txt \
    && python -m pip install --no-cache-dir -c /opt/nemo-lpo-image-constraints.txt -c /opt/nemo-lpo-tested.txt \
       -r /opt/nemo-lpo-requirements.txt

# 3. This package, editable so that conf/ and recipes/ resolve from /workspace/nemo-lpo.
COPY . .
RUN python -m pip install --no-cache-dir --no-deps --no-build-isolation -e . \
    && python -c 'import importlib.metadata as m; \
pins = dict(line.strip().split("==") for line in open("constraints.txt") if "==" in line and not line.startswith("#")); \
got, want = m.version("megatron-core"), pins["megatron-core"]; assert got == want, ("megatron-core", got, want)' \
    && python -m pip list --format=freeze | grep -iE '^(torch|numpy)==' | diff - <(grep -iE '^(torch|numpy)==' /opt/nemo-lpo-image-constraints.txt) \
    && nemo-lpo --version

CMD ["bash"]
