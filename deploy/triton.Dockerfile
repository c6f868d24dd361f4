# NVIDIA's Triton with what labelloop's python steps (decode, letterbox, NMS) import.
# Keep the tag's onnxruntime (24.10: 1.19.2) in mind: labelloop exports opset 17, IR <= 9.
ARG TRITON_TAG=24.10-py3
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}
RUN pip install --no-cache-dir "numpy<2" "pillow>=10.3" "opencv-python-headless>=4.9,<4.12"
