"""Property-based fuzzing of our own OpenAPI document with schemathesis: whatever it sends to
the generation, conversations, models, files, fine-tuning and batch routes, no 5xx and no
response that breaks the schema we publish."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.server import LiveServer, start_server

ROUTES = (
    r"^/(v1/(completions|chat/completions|responses|conversations|models|files|fine_tuning"
    r"|batches)"
    r"|tokenize|detokenize)"
)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzzed(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    # Ceilings keep each generated request small; they are part of what gets fuzzed.
    args = ("--max-tokens-limit", "16", "--max-prompt-tokens", "128", "--max-file-bytes", "65536")
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("fuzz"), *args)
    yield srv
    srv.stop()


def fuzz_operation(operation, mode: GenerationMode) -> None:  # noqa: ANN001 - APIOperation
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=20,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,  # the same examples every CI run
        database=None,
    )
    def run(case) -> None:  # noqa: ANN001
        case.call_and_validate(checks=CHECKS)

    run()


def test_no_5xx_and_responses_match_our_schema(fuzzed: LiveServer) -> None:
    schema = schemathesis.openapi.from_url(fuzzed.url + "/openapi.json")
    operations = [r.ok() for r in schema.include(path_regex=ROUTES).get_all_operations()]
    assert len(operations) >= 12
    failures = []
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                fuzz_operation(op, mode)
            except Unsatisfiable:
                pass  # no invalid input exists for it (e.g. a free-form path id): nothing to try
            except Exception as e:  # noqa: BLE001 - collect all, report together
                failures.append(f"{mode.value} {op.method.upper()} {op.path}: {str(e)[:1500]}")
    assert not failures, "\n\n".join(failures)
