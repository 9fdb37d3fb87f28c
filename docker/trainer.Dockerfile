# syntax=docker/dockerfile:1
# The trainer (`ecg-trainer`) on PyTorch's CUDA runtime image. Build from the repository root:
#
#   docker build -f docker/trainer.Dockerfile -t ecg-trainer:0.1.0 .
#   docker run --gpus all -v "$PWD/data/mitdb:/data/mitdb:ro" -v "$PWD/runs:/workspace/runs" \
#       ecg-trainer:0.1.0 fit generator
#
# The base image's torch is the CUDA build the project pins (train extra: torch==2.13.0); it is
# never replaced. pip gets a constraint file pinning torch to exactly the installed build (e.g.
# torch==2.13.0+cu126), so resolving the train extra finds torch already satisfied and cannot
# fetch another one from PyPI; the step fails if torch changed anyway. The CUDA 12.6 runtime needs
# an NVIDIA driver >= 560 on the host; without a GPU the trainer runs on the CPU (--device auto).

FROM pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime
LABEL org.opencontainers.image.title="ecg-trainer" \
      org.opencontainers.image.description="Trains the beat generator and classifier of the ECG edge and exports them as ONNX" \
      org.opencontainers.image.licenses="MIT"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MITDB_DIR=/data/mitdb
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edge/ edge/
COPY trainer/ trainer/
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch-constraint.txt \
    && pip install --no-cache-dir --constraint /tmp/torch-constraint.txt ".[train]" \
    && python -c "import sys, torch; want = open('/tmp/torch-constraint.txt').read().strip(); got = 'torch==' + torch.__version__; sys.exit(None if got == want else f'torch was replaced: {want} -> {got}')" \
    && rm -rf /src /tmp/torch-constraint.txt
RUN groupadd --system --gid 10001 trainer \
    && useradd --system --no-log-init --uid 10001 --gid trainer --home-dir /workspace --no-create-home \
       --shell /usr/sbin/nologin trainer \
    && mkdir -p /data/mitdb /workspace/runs \
    && chown trainer:trainer /data/mitdb /workspace /workspace/runs
USER 10001:10001
WORKDIR /workspace
# The MIT-BIH records (read-only is enough; `ecg-trainer data download /data/mitdb` fills an empty
# writable one) and the run directories (runs/<task>/NNN: options, metrics, checkpoints, models).
VOLUME ["/data/mitdb", "/workspace/runs"]
ENTRYPOINT ["ecg-trainer"]
CMD ["--help"]
