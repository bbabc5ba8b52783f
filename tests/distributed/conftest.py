import pytest


@pytest.fixture(scope="session")
def references(tmp_path_factory):
    """1-process adapters over the same global batches, trained once per method (see train_worker)."""
    import train_worker

    made = {}

    def get(method: str):
        if method not in made:
            made[method] = tmp_path_factory.mktemp(f"reference-{method}")
            train_worker.single_process_adapter(method, made[method])
        return made[method]

    return get
