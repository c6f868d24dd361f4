# The bridge only: the serve-side install (no torch, no ultralytics).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY labelloop labelloop
COPY serving serving
COPY ls_bridge ls_bridge
COPY trainer trainer
RUN pip install --no-cache-dir .
USER nobody
ENV LABELLOOP_STATE_DIR=/state
EXPOSE 9090
ENTRYPOINT ["labelloop", "bridge", "--host", "0.0.0.0", "--port", "9090"]
