# syntax=docker/dockerfile:1
# The edge (`ecg-edge`): numpy, scipy, onnxruntime, MQTT and the shipped ONNX models inside
# the package. No torch and no compiler: every dependency comes as a wheel, installed into a venv in
# the builder stage, and only the venv reaches the final image. Build from the repository root:
#
#   docker build -f docker/edge.Dockerfile -t ecg-edge:0.1.0 .
#
# EXTRAS: `wfdb` (WFDB replay sources, the WFDB sink, `anonymize`, `simulate`; it brings pandas and
# matplotlib, about 210 MB) and `ble` (Polar H10 straps; bleak talks to the host's BlueZ over D-Bus,
# see docker/README.md). `--build-arg EXTRAS=ble` gives an MQTT-only edge about 210 MB smaller.
# Never `train`, `test` or `all`: they pull torch.

FROM python:3.11.14-slim-bookworm AS builder
ARG EXTRAS=wfdb,ble
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/ecg-edge
WORKDIR /src
# Only the edge package: setuptools finds no trainer/ here, so the wheel holds edge/ alone (its
# ecg-trainer script, which could only fail without the trainer and torch, is removed).
COPY pyproject.toml README.md ./
COPY edge/ edge/
RUN /opt/ecg-edge/bin/pip install --no-cache-dir --only-binary=:all: ".[${EXTRAS}]" \
    && /opt/ecg-edge/bin/python -c "import importlib.util as u, sys; sys.exit('torch in the edge image' if u.find_spec('torch') else 0)" \
    && /opt/ecg-edge/bin/python -m pip uninstall --yes setuptools pip \
    && rm /opt/ecg-edge/bin/ecg-trainer

FROM python:3.11.14-slim-bookworm
LABEL org.opencontainers.image.title="ecg-edge" \
      org.opencontainers.image.description="ECG edge: replaces every heartbeat of live ECG with a same-class synthetic surrogate" \
      org.opencontainers.image.licenses="MIT"
ENV PATH=/opt/ecg-edge/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 ecg \
    && useradd --system --no-log-init --uid 10001 --gid ecg --home-dir /var/lib/ecg-edge --create-home \
       --shell /usr/sbin/nologin ecg
COPY --from=builder /opt/ecg-edge /opt/ecg-edge
# The compose configuration is the default; mount your own over it.
COPY docker/edge.toml /etc/ecg-edge/edge.toml
USER 10001:10001
WORKDIR /var/lib/ecg-edge
# Prometheus metrics ([metrics] port in edge.toml).
EXPOSE 9108
ENTRYPOINT ["ecg-edge"]
CMD ["run", "--config", "/etc/ecg-edge/edge.toml"]
