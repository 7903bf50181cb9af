from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property-based tests: no per-example deadline (the 2-core CI machine is shared and noisy); a bounded number of
# examples keeps the default suite in budget. ACMIX_HYPOTHESIS_EXAMPLES raises it for a longer local sweep.
settings.register_profile(
    "acmix",
    deadline=None,
    max_examples=int(os.environ.get("ACMIX_HYPOTHESIS_EXAMPLES", "12")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=False,
)
settings.load_profile("acmix")

# pytest-xdist runs one worker per core (`make test`: -n 2 on the 2-core CI machine). Each worker computing with
# torch's default of one thread per core oversubscribes the cores, which made steps many times slower under load;
# one intra-op thread per worker. Tests about threading set their own count.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = os.environ.get("ACMIX_RUN_SLOW") == "1"
    has_gpu = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: set ACMIX_RUN_SLOW=1 (make test-slow)"))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def fresh_seed(request: pytest.FixtureRequest) -> int:
    """A new random seed for every run (fast paths are checked on fresh random inputs), seeded into torch.

    The seed is attached to the test report, so a failure names it: rerun with ACMIX_SEED=<seed> to reproduce.
    """
    seed = int(os.environ.get("ACMIX_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    return seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    seeds = [v for k, v in item.user_properties if k == "seed"]
    if report.failed and seeds:
        report.sections.append(("acmix seed", f"fresh_seed = {seeds[-1]} (rerun with ACMIX_SEED={seeds[-1]})"))
