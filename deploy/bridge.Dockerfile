# The bridge only: the `bridge` extra (FastAPI, tritonclient, Pillow; no torch, onnxruntime, OpenCV or
# tritonserver), so no system libraries beyond the slim image.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY core core
COPY labelloop labelloop
COPY serving serving
COPY ls_bridge ls_bridge
COPY trainer trainer
RUN pip install --no-cache-dir ".[bridge]"
# The state volume (events, generated bridge credentials) must be writable by the unprivileged user:
# a named volume takes this folder's owner when it is first created.
RUN mkdir -p /state && chown nobody /state
USER nobody
ENV LABELLOOP_STATE_DIR=/state
EXPOSE 9090
# 0.0.0.0 is the container's own network namespace: reachable only through the ports you publish
# (docker-compose.gpu.yml publishes on 127.0.0.1). Basic auth is on: BASIC_AUTH_USER/_PASS, or a
# pair generated into /state/bridge-auth.json.
ENTRYPOINT ["labelloop", "bridge", "--host", "0.0.0.0", "--port", "9090"]
