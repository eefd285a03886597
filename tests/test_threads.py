"""Thread counts come from the CPUs the process may use and the model's size."""

from __future__ import annotations

import numpy as np
import pytest

from normalcy import threads


def _write(folder, name, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)


def test_cgroup_v2_quota_is_read(tmp_path):
    _write(tmp_path, "cpu.max", "150000 100000\n")
    assert threads.cgroup_cpu_quota(tmp_path) == pytest.approx(1.5)


def test_cgroup_v2_without_limit_is_none(tmp_path):
    _write(tmp_path, "cpu.max", "max 100000\n")
    assert threads.cgroup_cpu_quota(tmp_path) is None


def test_cgroup_v1_quota_is_read(tmp_path):
    _write(tmp_path / "cpu", "cpu.cfs_quota_us", "50000\n")
    _write(tmp_path / "cpu", "cpu.cfs_period_us", "100000\n")
    assert threads.cgroup_cpu_quota(tmp_path) == pytest.approx(0.5)


def test_cgroup_v1_unlimited_is_none(tmp_path):
    _write(tmp_path / "cpu", "cpu.cfs_quota_us", "-1\n")
    _write(tmp_path / "cpu", "cpu.cfs_period_us", "100000\n")
    assert threads.cgroup_cpu_quota(tmp_path) is None


def test_quota_caps_affinity_and_never_goes_below_one(tmp_path):
    _write(tmp_path, "cpu.max", "50000 100000\n")  # half a CPU
    assert threads.available_cpus(tmp_path) == 1
    _write(tmp_path, "cpu.max", "100000000 100000\n")  # 1000 CPUs: affinity decides
    assert threads.available_cpus(tmp_path) == threads.affinity_cpus()


def test_small_models_train_on_one_thread_large_on_every_cpu():
    assert threads.training_threads(50_000, cpus=8) == 1
    assert threads.training_threads(threads.SMALL_MODEL_PARAMETERS, cpus=8) == 8
    assert threads.training_threads(50_000, override=3, cpus=8) == 3


def test_scoring_uses_every_available_cpu_unless_overridden():
    assert threads.scoring_threads(cpus=4) == 4
    assert threads.scoring_threads(override=2, cpus=4) == 2


@pytest.mark.parametrize("function", [threads.training_threads, threads.scoring_threads])
def test_bad_override_is_refused(function):
    args = (10,) if function is threads.training_threads else ()
    with pytest.raises(ValueError, match="null"):
        function(*args, override=0)


def test_torch_threads_restores_the_previous_count():
    import torch

    before = torch.get_num_threads()
    with threads.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_train_threads_reach_the_candidates_that_train():
    from normalcy.config import TrainParams
    from normalcy.pipeline.train import build_candidate

    params = TrainParams(threads=1, candidates=["autoencoder", "knn"])
    assert build_candidate("autoencoder", params).threads == 1
    assert not hasattr(build_candidate("knn", params), "threads")  # knn trains no network


def test_a_small_network_trains_on_one_thread_and_the_count_is_restored():
    import numpy as np
    import torch

    from normalcy.detectors.autoencoder import Autoencoder

    class Probe(Autoencoder):
        def on_epoch_end(self, epoch: int) -> None:
            self.threads_seen = torch.get_num_threads()

    rows = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    with threads.torch_threads(2):
        automatic = Probe(epochs=1).fit(rows)
        assert torch.get_num_threads() == 2
        overridden = Probe(epochs=1, threads=2).fit(rows)
    assert automatic.threads_seen == 1  # a few thousand parameters
    assert overridden.threads_seen == 2


def test_a_detector_threads_param_is_a_whole_number_numpy_included():
    from normalcy.threads import checked_threads

    assert checked_threads("padim", None) is None
    assert checked_threads("padim", np.int64(2)) == 2
    assert type(checked_threads("padim", np.int64(2))) is int
    for wrong in (2.0, True, "2"):
        with pytest.raises(ValueError, match="padim: threads must be a whole number >= 1 or null"):
            checked_threads("padim", wrong)
    with pytest.raises(ValueError, match="padim: threads must be >= 1 or null"):
        checked_threads("padim", np.int32(0))
