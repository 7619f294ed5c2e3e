"""The server against its own OpenAPI document, by Schemathesis: generated requests on every operation, valid ones
(which must be accepted) and invalid ones (which must be refused), each response checked by every check
Schemathesis has (no 5xx, statuses, content types, bodies and headers as documented). A bounded run here; a longer
one is marked slow.

(The operations are walked here rather than with `@schema.parametrize()`: Schemathesis' lazy fixture loading reads
a pytest node attribute that pytest 9 no longer has.)"""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from server.app import create_app
from tests.server.conftest import server_settings

LIMITS = {"max_steps": 3, "max_images_per_request": 2, "max_prompt_chars": 200, "max_wait_ms": 0.0}


@pytest.fixture(scope="module")
def api(tiny_bundle, pipeline):
    app = create_app(server_settings(tiny_bundle, **LIMITS), pipeline)
    with TestClient(app):  # started: the engine runs, the server is ready
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


def _keep_the_contract(api, examples: int) -> None:
    failures = []
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /generate", "POST /v1/images/generations", "GET /v1/codes"}
    for operation in operations:
        for mode in schemathesis.GenerationMode:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
            def check(case):
                case.call_and_validate()

            try:
                check()
            except Unsatisfiable:
                assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label
                continue  # an operation with no parameters and no body: nothing can be made invalid
            except Exception as error:  # noqa: BLE001 - collect every operation's failures, then report them all
                failures.append(f"{operation.label} ({mode.value}): {error}")
    assert not failures, "\n\n".join(failures)


def test_every_operation_keeps_the_contract(api):
    _keep_the_contract(api, examples=10)


@pytest.mark.slow
def test_every_operation_keeps_the_contract_at_length(api):
    _keep_the_contract(api, examples=100)
