"""The one-off run behind image_validation_magnetic_tile_fastflow_position_score.log: one
fastflow fit per stage choice, its map scored with both `position_score`s on image_validation's
validation set (held-out train/good images with synthetic defects; test/ is never read).

    HF_HUB_OFFLINE=1 PYTHONPATH=src OMP_NUM_THREADS=1 python \
        benchmarks/results/fastflow_position_score.py ../shared/data/images/magnetic_tile
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from image_validation import validation_set  # noqa: E402
from quality_images import image_and_pixel_metrics  # noqa: E402

from normalcy.data.mvtec import load_mvtec  # noqa: E402
from normalcy.detectors import create_detector  # noqa: E402

train = load_mvtec(sys.argv[1], "train", 128)
fit, images, labels, masks, kinds = validation_set(train.X, 0)
fit = fit[:150]
for stages in ([1, 2, 3], [2, 3]):
    start = time.perf_counter()
    detector = create_detector("fastflow", image_size=128, stages=stages, epochs=15).fit(fit)
    seconds = time.perf_counter() - start
    for position_score in ("likelihood", "nll"):
        detector.flows.position_score = position_score  # the same flows, the other map
        out = detector.predict(images)
        row = image_and_pixel_metrics(out["score"], out["anomaly_map"], labels, masks, kinds)
        print(
            f"stages {stages} epochs 15 position_score {position_score}: "
            f"image_auroc {row['image_auroc']:.3f} pixel_auroc {row['pixel_auroc']:.3f} "
            f"aupro {row['aupro']:.3f} fit {seconds:.0f}s",
            flush=True,
        )
