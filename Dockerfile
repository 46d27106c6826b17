# One image for the coordinator, the clients and `fedlink certs`; `fedlink` is the entrypoint.
#
#   docker build -t fedlink .                                      # CPU (the default)
#   docker build -t fedlink:cuda --build-arg TORCH_VARIANT=cu130 .  # CUDA 13.0
#
# PyTorch comes from its own index for TORCH_VARIANT: the CPU wheels are about 200 MB, where
# PyPI's default torch is the multi-GB CUDA build. The CUDA wheels bring their CUDA libraries
# with them, so the same slim base serves both; the host needs only the NVIDIA driver and
# container toolkit. Offline, put torch (and torchvision) wheels into wheels/ and they are
# installed instead of asking the index (scripts/compose-smoke.sh does that).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/fedlink
COPY wheels/ /wheels/
# The torch build installed here is pinned when fedlink's own dependencies come from PyPI.
RUN set -e; \
    if ls /wheels/*.whl >/dev/null 2>&1; then \
        /opt/fedlink/bin/pip install /wheels/*.whl; \
    else \
        /opt/fedlink/bin/pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
            torch torchvision; \
    fi; \
    /opt/fedlink/bin/pip list --format=freeze | grep -E '^(torch|torchvision)==' > /tmp/torch-pins.txt
COPY pyproject.toml README.md /src/
COPY cli /src/cli
COPY common /src/common
COPY server /src/server
COPY client /src/client
COPY protos /src/protos
RUN /opt/fedlink/bin/pip install --constraint /tmp/torch-pins.txt /src

FROM ${PYTHON_IMAGE}
RUN useradd --user-group --uid 10001 --create-home --home-dir /var/lib/fedlink fedlink
COPY --from=build /opt/fedlink /opt/fedlink
ENV PATH=/opt/fedlink/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER fedlink
WORKDIR /var/lib/fedlink
EXPOSE 50051
# Asks the coordinator's grpc.health.v1 service over mTLS; needs FEDLINK_HEALTH_* (see
# docs/configuration.md). Meant for the coordinator: clients turn it off (docker-compose.yml).
HEALTHCHECK --interval=10s --timeout=10s --start-period=60s --retries=3 CMD ["fedlink", "health"]
ENTRYPOINT ["fedlink"]
CMD ["--help"]
