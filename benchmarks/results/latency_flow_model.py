"""Median onnxruntime latency of one 256x256 magnetic tile test image (batch 1, 2 threads) for a
graph the train flow exported: `python latency_flow_model.py MODEL.onnx CATEGORY_DIR`."""

import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

from normalcy.data.mvtec import load_mvtec


def main() -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    images = load_mvtec(sys.argv[2], "test", 256).X[:40].astype(np.float32)
    for image in images[:3]:  # warm-up
        session.run(None, {name: image[None]})
    times = []
    for image in images:
        start = time.perf_counter()
        session.run(None, {name: image[None]})
        times.append(1000 * (time.perf_counter() - start))
    print(
        f"input {session.get_inputs()[0].type} {images.shape[1:]}: median "
        f"{statistics.median(times):.1f} ms, min {min(times):.1f} ms over {len(times)} images"
    )


if __name__ == "__main__":
    main()
