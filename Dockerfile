# One image for every spendgate process: `spendgate operator` (operator and admission webhook),
# `spendgate sidecar` (injected next to model containers) and the chart's `helm test` pod.
#
#   docker build -t ghcr.io/spendgate/spendgate:0.1.0 .
#
# The base is pinned to a patch release; bump PYTHON_IMAGE deliberately (and rebuild for its
# security fixes). The chart's image.digest pins the built image itself.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# --- build: install the distribution and its dependencies into a virtualenv ------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/spendgate
WORKDIR /src
COPY pyproject.toml README.md ./
COPY spendgate ./spendgate
COPY operator ./operator
COPY sidecar ./sidecar
RUN /opt/spendgate/bin/pip install '.[operator]' \
 && /opt/spendgate/bin/python -m compileall -q /opt/spendgate/lib \
 && /opt/spendgate/bin/spendgate --help >/dev/null

# --- runtime: the virtualenv on the same base, nothing else ------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="spendgate" \
      org.opencontainers.image.description="Hard spend caps in front of GPU inference" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/spendgate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/spendgate /opt/spendgate
# Non-root, numeric (Kubernetes runAsNonRoot can check it); the chart also runs with a
# read-only root filesystem and an emptyDir on /tmp.
USER 65532:65532
WORKDIR /tmp
EXPOSE 8080 8081 8443 8444
ENTRYPOINT ["spendgate"]
CMD ["--help"]
