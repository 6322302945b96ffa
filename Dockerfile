# The project's image: Python 3.11, PyTorch (PyPI's CUDA 13.0 build, which also runs on CPU), the project
# with its GPU extras and LVIS, and a trained spaCy English pipeline. It runs as a non-root user and
# writes runs under /app/runs, the folder to mount (README.md, "Docker"):
#   docker build -t regionclip-pipeline .
#   mkdir -p runs && docker run --rm --shm-size=8g -v "$PWD/runs:/app/runs" --user "$(id -u):$(id -g)" \
#       regionclip-pipeline run manifests/demo.yaml                  # add --gpus all on a GPU machine
FROM python:3.11-slim-bookworm

# torch and torchvision are pinned as a pair (torchvision's compiled ops match one torch); at least the
# floors of pyproject.toml (torch 2.6: its weights_only loader is safe), which tests/test_docker.py checks.
# PyPI's torch 2.14.1 is built for CUDA 13.0 (its CUDA libraries come as nvidia-* wheels): on a GPU the
# host needs an NVIDIA driver of the R580 series or newer (`--gpus all` passes the host's driver in).
# For an older driver, torch's CUDA 12.x builds are on PyTorch's own package index, not on PyPI
# (docs/cluster.md, "GPU notes"); manifests/ray-cluster-gpu.yaml installs this same pair.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 \
    MPLCONFIGDIR=/tmp/matplotlib

# lvis needs OpenCV, and OpenCV needs libGL and GLib, which the slim image lacks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY trainer ./trainer
COPY stages ./stages
COPY manifests ./manifests

# The `gpu` extra brings faiss-gpu (and no faiss-cpu: the two ship the same `faiss` module), with its CUDA 12
# runtime wheels: a second CUDA runtime beside torch's 13.0 in the same process (different library names;
# the R580 driver runs both). en_core_web_sm is the trained parser the concepts stage prefers.
RUN pip install ".[gpu,lvis]" \
 && python -m spacy download en_core_web_sm

# Runs are written by a user of its own; manifests/demo.yaml's output_dir (../runs/demo) lands in
# /app/runs, the mount point. `--user "$(id -u):$(id -g)"` makes the files the host user's instead.
RUN useradd --create-home --uid 1000 regionclip \
 && mkdir -p /app/runs && chown regionclip:regionclip /app/runs
USER regionclip
VOLUME ["/app/runs"]

ENTRYPOINT ["regionclip"]
CMD ["--help"]
