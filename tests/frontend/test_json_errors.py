"""A request body that is not JSON: the 400 names where the syntax breaks (line,
column, offset), in the OpenAI error shape, on both generation routes."""

import httpx
import pytest

from kvmesh.frontend.app import create_app
from kvmesh.tokenizer import Tokenizer
from tests.frontend import StubBackend, running_server

BROKEN = [  # body, the reason after "not valid JSON: "
    (b'{"model": "stub", "prompt": ', "Expecting value: line 1 column 29 (char 28)"),
    (
        b'{\n  "model": "stub",\n  "prompt": "hi",,\n}',
        "Expecting property name enclosed in double quotes: line 3 column 18 (char 38)",
    ),
    (b'{"model": "stub"}\n[1]', "Extra data: line 2 column 1 (char 18)"),
]


@pytest.fixture(scope="module")
def http(tiny_model_dir):
    stub = StubBackend(Tokenizer.from_pretrained(tiny_model_dir))
    with running_server(create_app(stub)) as base_url, httpx.Client(base_url=base_url) as client:
        yield client


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(("body", "reason"), BROKEN, ids=["cut_short", "double_comma", "extra"])
def test_invalid_json_is_a_400_with_line_and_column(http, path, body, reason):
    response = http.post(path, content=body, headers={"content-type": "application/json"})
    assert (response.status_code, response.json()) == (
        400,
        {
            "error": {
                "message": f"the request body is not valid JSON: {reason}",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_value",
            }
        },
    )
