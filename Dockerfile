# GPU image: CUDA PyTorch base, the project with its GPU extras, and a trained spaCy English pipeline.
#   docker build -t regionclip-pipeline .
#   docker run --gpus all -v $PWD/runs:/app/runs regionclip-pipeline run manifests/cc3m-rn50.yaml
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
WORKDIR /app

COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY trainer ./trainer
COPY stages ./stages
COPY manifests ./manifests

# The `gpu` extra brings faiss-gpu-cu12 (and no faiss-cpu: the two ship the same `faiss` module);
# en_core_web_sm is the trained parser the concepts stage prefers.
RUN pip install ".[gpu,lvis]" \
 && python -m spacy download en_core_web_sm

ENTRYPOINT ["regionclip"]
CMD ["--help"]
