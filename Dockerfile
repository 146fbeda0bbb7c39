# syntax=docker/dockerfile:1
# The `search` image: one image for the study-creating step, the GPU workers and the dashboard.
#
#   docker build -t gridfleet-search .
#   docker run --rm --gpus device=0 -e SEARCH_STORAGE gridfleet-search worker digits-mlp --device cuda:0
#
# torch comes from PyPI, whose Linux x86-64 wheels bundle the CUDA runtime (the nvidia-* packages),
# so a plain Python base image is enough: the host needs only the NVIDIA driver and the NVIDIA
# Container Toolkit. For a CPU-only image pass
#   --build-arg PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu"
FROM python:3.11-slim

ARG PIP_EXTRA=""
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PYTHONPATH=/app

WORKDIR /app

# The package first, so that editing a study file does not reinstall torch.
COPY pyproject.toml README.md* ./
COPY search ./search
# PIP_EXTRA is deliberately unquoted: it holds zero or more pip arguments.
RUN pip install $PIP_EXTRA .

# Study files, and examples/ for specs whose objective is `examples.<module>:<function>`
# (importable because PYTHONPATH=/app).
COPY studies ./studies
COPY examples ./examples

# Mount points of the compose file's named volumes: a new volume takes this owner.
RUN useradd --create-home --uid 1000 search \
    && mkdir -p /checkpoints /claims \
    && chown search:search /checkpoints /claims
USER search

ENTRYPOINT ["search"]
CMD ["--help"]
