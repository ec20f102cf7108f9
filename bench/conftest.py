"""Options of the benchmark suites: ``--quick`` (or BENCH_QUICK=1) runs every benchmark at a small size."""


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False,
                     help="bench suites: small shapes that exercise every code path in seconds (CI smoke run)")
    parser.addoption("--default-malloc", action="store_true", default=False,
                     help="CPU suite: keep glibc's default malloc thresholds (by default the suite calls "
                          "gessl_ext.retain_freed_memory() for every implementation it compares)")


def pytest_configure(config):
    config.addinivalue_line("markers", "target: a configuration that a performance target of issue 5 or 8 is stated for")
    config.addinivalue_line("markers", "compile: the torch.compile variant of the GPU suite (long compilation)")
