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
# Slim the environment before the runtime stage copies it (1,384 MiB down to 838 MiB with the
# bytecode step below). Nothing removed is used at run time, which the import check proves:
# - grpcio-tools: generates protobuf code at development time only; pip and setuptools:
#   install and build nothing here;
# - torch's C++ headers, test binaries, cmake files and static libraries (for building
#   extensions, which needs a compiler the image does not have); the TensorBoard UI's fast
#   loader binary (fedlink writes event files; `tensorboard` itself runs elsewhere);
# - every package's `tests` directory, type stubs (`*.pyi`, for type checkers), torch's
#   libraries for its own tests, the TensorBoard UI (`webfiles.zip`), and the `benchmarks` and
#   `examples` packages opacus's wheel puts at the top level of site-packages;
# - the symbol tables of torch's libraries (`strip --strip-unneeded` keeps the dynamic symbols
#   that loading needs; about 90 MB of libtorch_cpu.so alone). Only torch's: the libraries that
#   auditwheel bundled into other wheels (`*.libs/`) no longer load once stripped. binutils
#   stays in this stage.
RUN set -e; \
    /opt/fedlink/bin/pip uninstall -y -q grpcio-tools setuptools; \
    site=$(/opt/fedlink/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))'); \
    cd "$site"; \
    rm -rf torch/include torch/test torch/share/cmake tensorboard_data_server/bin \
        tensorboard/webfiles.zip benchmarks examples; \
    find torch/bin -type f ! -name torch_shm_manager -delete; \
    rm -f torch/lib/*.a torch/lib/libjitbackend_test.so torch/lib/libtorchbind_test.so \
        torch/lib/libbackend_with_compiler.so torch/lib/libaoti_custom_ops.so; \
    find . -type d -name tests -prune -exec rm -rf {} +; \
    find . -name '*.pyi' -delete; \
    if (apt-get update -q && apt-get install -y -q --no-install-recommends binutils) >/dev/null 2>&1; then \
        strip --strip-unneeded torch/lib/*.so*; \
    else \
        echo "binutils could not be installed: native libraries are not stripped" >&2; \
    fi; \
    /opt/fedlink/bin/python -m pip uninstall -y -q pip; \
    /opt/fedlink/bin/python -c 'import torch, sklearn, scipy, matplotlib, opacus, torch.utils.tensorboard, fedlink.main; model = torch.nn.Linear(4, 2); model(torch.randn(3, 4)).sum().backward()'; \
    /opt/fedlink/bin/fedlink --help >/dev/null
# Bytecode only for what a federation imports (a quarter of the environment otherwise): every
# .pyc goes, then a short `fedlink demo` (a coordinator and two clients over mTLS on loopback)
# compiles what it imports into /opt/fedlink/pycache, where the image's Python looks for
# bytecode (PYTHONPYCACHEPREFIX). A module outside it is compiled in memory on first import:
# a slower start for that process, nothing else.
RUN set -e; \
    find /opt/fedlink -name __pycache__ -prune -exec rm -rf {} +; \
    cd /tmp; \
    PYTHONPYCACHEPREFIX=/opt/fedlink/pycache /opt/fedlink/bin/fedlink demo --clients 2 --rounds 2 \
        --run-dir /tmp/demo >/tmp/demo.log 2>&1 || { cat /tmp/demo.log; exit 1; }; \
    rm -rf /tmp/demo /tmp/demo.log

# The runtime: the base without what only apt and people reading manuals use (package lists
# and caches, documentation, man pages, translations) and without the base Python's own
# packages (pip, setuptools, wheel: fedlink's environment does not read them, and installs
# nothing), then fedlink's environment. Deleting files in a layer of its own would hide them and
# keep their bytes, so the last stage copies the result into one layer. The cost: the base's
# layer is not shared with other images (it is small beside fedlink's own).
FROM ${PYTHON_IMAGE} AS runtime
RUN set -e; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/* /usr/share/doc/* /usr/share/man/* \
        /usr/share/info/* /usr/share/locale/*; \
    for site in $(python3 -c 'import site; print(*site.getsitepackages())'); do \
        rm -rf "$site"/*; \
    done; \
    useradd --user-group --uid 10001 --create-home --home-dir /var/lib/fedlink fedlink
COPY --from=build /opt/fedlink /opt/fedlink

FROM scratch
COPY --from=runtime / /
ENV PATH=/opt/fedlink/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PYTHONPYCACHEPREFIX=/opt/fedlink/pycache
USER fedlink
WORKDIR /var/lib/fedlink
EXPOSE 50051
# Asks the coordinator's grpc.health.v1 service over mTLS; needs FEDLINK_HEALTH_* (see
# docs/configuration.md). Meant for the coordinator: clients turn it off (docker-compose.yml).
HEALTHCHECK --interval=10s --timeout=10s --start-period=60s --retries=3 CMD ["fedlink", "health"]
ENTRYPOINT ["fedlink"]
CMD ["--help"]
