"""Every shipped model on a GPU (issue 26): run as a worker runs it there - on ``cuda``, with float16 mixed
precision (AMP) where the loader uses it and cuDNN's benchmark mode on (``worker.cudnn_benchmark``) - on a
300-slice 512 x 512 chest CT, it gives the CPU's result within tolerance (label maps voxel by voxel and per
label, detections matched by centre and score, class probabilities), and its peak device memory stays within
a bound that lets the models share a 16 GB card.

Marked ``gpu``: tests/conftest.py skips them where ``torch.cuda.is_available()`` is false (CI, the development
machines). The figures they print are the ones ``python bench/gpu.py`` reports in full; the tolerances and
bounds are in :mod:`tests.gpu.cases`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.gpu.cases import (
    DEVICE_MEMORY_BOUND_MIB,
    MODEL_IDS,
    Timed,
    chest_ct,
    detection_threshold,
    load,
    result_differences,
    shipped_registry,
    timed_predict,
)
from workers.models.registry import ModelRegistry
from workers.volume import Volume

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(1800)]  # the CPU reference runs take minutes

@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return shipped_registry()


@pytest.fixture(scope="module")
def ct() -> Volume:
    return chest_ct()


@pytest.fixture(scope="module")
def runs(registry: ModelRegistry, ct: Volume) -> Iterator[dict[str, dict[str, Timed]]]:
    """Per model, computed once: ``first`` and ``warm`` runs on cuda (cuDNN benchmark on), ``cpu`` the reference."""
    before = torch.backends.cudnn.benchmark

    class Runs(dict[str, dict[str, Timed]]):
        def __missing__(self, model_id: str) -> dict[str, Timed]:
            model = load(registry, model_id, "cuda", cudnn_benchmark=True)
            first = timed_predict(model, ct)
            warm = timed_predict(model, ct)
            cpu = timed_predict(registry.load(model_id, device="cpu"), ct)
            print(f"\n{model_id} on {torch.cuda.get_device_name(0)}: first call {first.seconds:.2f} s, warmed "
                  f"{warm.seconds:.2f} s (peak {warm.peak_mib:.0f} MiB), CPU {cpu.seconds:.1f} s")
            self[model_id] = {"first": first, "warm": warm, "cpu": cpu}
            return self[model_id]

    yield Runs()
    torch.backends.cudnn.benchmark = before


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_model_on_cuda_gives_the_cpu_result(model_id: str, registry: ModelRegistry,
                                            runs: dict[str, dict[str, Timed]]) -> None:
    timed = runs[model_id]
    kind = registry.entry(model_id).kind
    # AMP where the loaders use it: convolutions of the segmentation and detection models ran in float16; the
    # classifier runs in float32 (docs/configuration.md, worker section); nothing in float16 on the CPU.
    if kind == "classification":
        assert timed["warm"].dtypes == {"float32"}, timed["warm"].dtypes
    else:
        assert "float16" in timed["warm"].dtypes, timed["warm"].dtypes
    assert "float16" not in timed["cpu"].dtypes and timed["cpu"].dtypes, timed["cpu"].dtypes
    threshold = detection_threshold(registry, model_id) if kind == "detection" else 0.0
    problems = result_differences(timed["cpu"].result, timed["warm"].result, threshold)
    assert not problems, f"{model_id}: cuda (AMP) and cpu differ:\n" + "\n".join(problems)
    repeat = result_differences(timed["first"].result, timed["warm"].result, threshold)
    assert not repeat, f"{model_id}: two runs on cuda differ:\n" + "\n".join(repeat)


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_device_memory_of_a_300_slice_ct_stays_within_bounds(model_id: str, runs: dict[str, dict[str, Timed]]) -> None:
    warm = runs[model_id]["warm"]
    assert warm.peak_mib is not None
    bound = DEVICE_MEMORY_BOUND_MIB[model_id]
    assert warm.peak_mib <= bound, (f"{model_id}: {warm.peak_mib:.0f} MiB of device memory at its peak on a "
                                    f"300-slice CT, more than {bound} MiB")
