"""The clock-penalty probe's command line, checked before any GPU work (so this runs on CPU)."""

import pytest

from benchmarks import sparse_clock_probe


@pytest.mark.parametrize("step", ["cusparse:128", "f1:big", "f1:12x"])
def test_unknown_steps_are_refused_before_any_gpu_work(step, monkeypatch):
    def no_gpu_work():
        raise AssertionError("the probes were built before the steps were checked")

    monkeypatch.setattr(sparse_clock_probe, "Probes", no_gpu_work)
    with pytest.raises(SystemExit, match="expected cslt:N or f1:N"):
        sparse_clock_probe.main(["cslt:128", step])
