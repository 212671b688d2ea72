def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: starts several processes with torchrun (CPU, gloo); about 30 s")
