# The image `pilot serve` runs from in the manifests `pilot deploy` writes (docs/deploy.md):
#
#   docker build -t pilot:0.1.0 .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t pilot:0.1.0-cu128 .
#
# The first builds on torch's CPU wheel; the second on a CUDA wheel, which carries the CUDA
# runtime itself (the node's driver comes in through the NVIDIA container toolkit).
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS wheel
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY engine ./engine
COPY planner ./planner
COPY profiles ./profiles
COPY search_spaces ./search_spaces
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

FROM python:${PYTHON_VERSION}-slim
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The engine compiles its C kernels on first start, for the CPU of the node it landed on (not
# the build machine's), so the image keeps a compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# torch first, from the chosen index, so that installing pilot (torch>=2.5) keeps it.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY --from=wheel /dist /tmp/dist
RUN pip install --no-cache-dir /tmp/dist/*.whl && rm -rf /tmp/dist

# A fixed numeric user, so Kubernetes' runAsNonRoot can check it; the kernels' build cache is
# the one folder it writes (an emptyDir over it in the manifests, whose root filesystem is read-only).
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin pilot \
    && mkdir -p /var/cache/pilot && chown 10001:10001 /var/cache/pilot
ENV PILOT_CACHE=/var/cache/pilot \
    PYTHONUNBUFFERED=1
USER 10001
WORKDIR /home/pilot
EXPOSE 8000
ENTRYPOINT ["pilot", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--config", "/etc/pilot/plan.yaml"]
