import gpu_roofline
import pytest
from bench_utils import measure_copy_bandwidth


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """The measured copy bandwidth of the benchmark device, in bytes per second."""
    return measure_copy_bandwidth()


@pytest.fixture(scope="session")
def roofline() -> dict:
    """The measured ceilings of the GPU (gpu_roofline.measure): copy bandwidth and matmul rates."""
    return gpu_roofline.measure("cuda")
