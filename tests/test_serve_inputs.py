"""What an operator or a client sends `sdfast serve` that it must refuse cleanly: start-up flags
(refused before any weights load, exit 2) and request bodies (a 4xx in OpenAI's error shape, never
a non-JSON 500), each next to the near-miss value that is accepted."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import sdfast.runtime  # noqa: E402
from sdfast.cli import main  # noqa: E402
from sdfast.errors import InvalidArgument  # noqa: E402
from sdfast.serve import ImageService, ServeConfig, create_app  # noqa: E402
from sdfast.serve.app import BackgroundServer  # noqa: E402
from sdfast.serve.service import check_config, check_warmup_sizes  # noqa: E402

# -- the configuration --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 0.0, 1e-9, 25, 1e6])
def test_max_wait_ms_from_zero_up_is_accepted(value):
    check_config(ServeConfig(max_wait_ms=value))


@pytest.mark.parametrize("value", [-1e-9, -1, math.nan, math.inf, -math.inf, "25", True])
def test_max_wait_ms_below_zero_or_not_finite_is_refused(value):
    with pytest.raises(InvalidArgument, match=r"^max-wait-ms: must be a finite number >= 0"):
        check_config(ServeConfig(max_wait_ms=value))


@pytest.mark.parametrize("value", [1e-6, 1, 300.0])
def test_timeout_above_zero_is_accepted(value):
    check_config(ServeConfig(timeout_s=value))


@pytest.mark.parametrize("value", [0, 0.0, -1, math.nan, math.inf])
def test_timeout_zero_negative_or_not_finite_is_refused(value):
    with pytest.raises(InvalidArgument, match=r"^timeout: must be a finite number > 0"):
        check_config(ServeConfig(timeout_s=value))


@pytest.mark.parametrize("key", ["k", "s3cret", "a-b_c.9~!", "with inner space"])
def test_api_keys_a_header_can_carry_are_accepted(key):
    check_config(ServeConfig(api_key=key))


@pytest.mark.parametrize("key,needle", [(" padded ", "whitespace"), ("padded ", "whitespace"), ("\tk", "whitespace"),
                                        ("k\n", "whitespace"), ("", "empty"), ("kéy", "ASCII"), ("k\x00y", "ASCII")])
def test_api_keys_no_request_could_match_are_refused(key, needle):
    with pytest.raises(InvalidArgument, match=rf"^api-key: .*{needle}"):
        check_config(ServeConfig(api_key=key))


@pytest.mark.parametrize("size", [(64, 64), (2048, 64), (72, 128)])
def test_warmup_sizes_in_range_pass_the_config_check(size):
    check_config(ServeConfig(warmup_sizes=[size]))


@pytest.mark.parametrize("size", [(0, 0), (63, 64), (64, 2049), (-64, 64)])
def test_warmup_sizes_out_of_range_are_refused(size):
    with pytest.raises(InvalidArgument, match=r"^warmup-size: the (height|width) must be 64 to 2048"):
        check_config(ServeConfig(warmup_sizes=[size]))


def test_warmup_sizes_follow_the_models_multiple_and_the_servers_limit(tiny_info):
    ok = ServeConfig(warmup_sizes=[(64, 72), (128, 128)])
    check_warmup_sizes(ok, tiny_info, 128)
    for size, needle in (((64, 65), "multiple of 8"), ((60 + 4, 68), "multiple of 8"), ((136, 64), "above")):
        with pytest.raises(InvalidArgument, match=rf"^warmup-size: .*{needle}"):
            check_warmup_sizes(ServeConfig(warmup_sizes=[size]), tiny_info, 128)


def test_a_warmup_size_outside_the_engines_profile_refuses_the_service(onnx_dynamic, tiny_info):
    import sdfast

    pipe = sdfast.load(tiny_info, backend="onnxruntime", engines=onnx_dynamic)
    profile = next(e.profile for e in pipe.engines.values() if getattr(e, "profile", None) is not None)
    inside = (profile.max_height, profile.max_width)
    ImageService(pipe, ServeConfig(warmup_sizes=[inside], max_side=4096))  # built, not started
    with pytest.raises(InvalidArgument, match=r"^warmup-size: .*outside the exported profile"):
        ImageService(pipe, ServeConfig(warmup_sizes=[(profile.max_height + 64, profile.max_width)], max_side=4096))


# -- the command line: refused before any weights load ------------------------------------------


@pytest.fixture
def no_weights(monkeypatch):
    """runtime.load raises a marker: reaching it means every flag check passed."""

    class Reached(Exception):
        pass

    def load(*a, **k):
        raise Reached

    monkeypatch.setattr(sdfast.runtime, "load", load)
    monkeypatch.delenv("SDFAST_API_KEY", raising=False)
    return Reached


@pytest.mark.parametrize("flags,needle", [
    (["--max-wait-ms", "nan"], "max-wait-ms: must be a finite number >= 0 but is nan"),
    (["--max-wait-ms", "inf"], "max-wait-ms: must be a finite number >= 0 but is inf"),
    (["--max-wait-ms", "-1"], "max-wait-ms: must be a finite number >= 0"),
    (["--timeout", "nan"], "timeout: must be a finite number > 0 but is nan"),
    (["--timeout", "0"], "timeout: must be a finite number > 0"),
    (["--warmup-size", "0x0"], "warmup-size: the height must be 64 to 2048"),
    (["--warmup-size", "65x64"], "warmup-size: 65x64: width: must be a multiple of 8"),
    (["--warmup-size", "64x64\n"], "warmup-size: must be WIDTHxHEIGHT"),
    (["--warmup-size", "\uff16\uff14x64"], "warmup-size: must be WIDTHxHEIGHT"),  # full-width digits
    (["--warmup-size", "256x256"], "warmup-size: 256x256: the height 256 is above this server's limit of 128"),
    (["--api-key", " padded "], "api-key: starts or ends with whitespace"),
    (["--api-key", ""], "api-key: empty"),
    (["--num-cpus", "nan"], "num-cpus: must be a finite number >= 0"),
    (["--replicas", "0"], "replicas: must be >= 1"),
])
def test_bad_serve_flags_exit_2_before_any_weights_load(flags, needle, no_weights, capsys):
    assert main(["serve", "--model", "tiny", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdfast serve: error: ") and needle in err and "\n" not in err


@pytest.mark.parametrize("flags", [[], ["--max-wait-ms", "0"], ["--timeout", "0.5"], ["--warmup-size", "72x64"],
                                   ["--warmup-size", "128x128"], ["--api-key", "s3cret"], ["--num-cpus", "0"]])
def test_the_near_miss_flags_pass_every_check(flags, no_weights):
    with pytest.raises(no_weights):
        main(["serve", "--model", "tiny", *flags])


# -- request bodies -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_pipe):
    service = ImageService(tiny_pipe, ServeConfig(api_key="k"))
    with BackgroundServer(create_app(service)) as url, httpx.Client(
            base_url=url, headers={"Authorization": "Bearer k"}, timeout=120) as http:
        assert service.wait_ready(120), service.state_detail
        yield url, http


def _openai_error(r, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "\n" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


DEEP = 100_000


@pytest.mark.parametrize("raw", [b"[" * DEEP + b"]" * DEEP,
                                 b'{"prompt": "x", "user": ' + b"[" * DEEP + b"]" * DEEP + b"}",
                                 b'{"prompt": "x", "seed": ' + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"}"])
def test_deeply_nested_json_is_a_400(server, raw):
    _, http = server
    err = _openai_error(http.post("/v1/images/generations", content=raw), 400, "body")
    assert "nested too deeply" in err["message"]


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "user": [[1]]}, "user"),
    ({"prompt": "x", "user": 5}, "user"),
    ({"prompt": "x", "model": {"id": "m"}}, "model"),
    ({"prompt": "x", "seed": [1]}, "seed"),
    ({"prompt": ["x"]}, "prompt"),
    ({"prompt": "x", "response_format": 0}, "response_format"),
    ({"prompt": "x", "response_format": False}, "response_format"),
    ({"prompt": "x", "response_format": []}, "response_format"),
    ({"prompt": "x", "response_format": ""}, "response_format"),
    ({"prompt": "x", "response_format": "url"}, "response_format"),
    ({"prompt": "x", "size": "64x64\n"}, "size"),
    ({"prompt": "x", "size": " 64x64"}, "size"),
    ({"prompt": "x", "size": "64X64"}, "size"),
    ({"prompt": "\ud800 a red circle"}, "prompt"),
    ({"prompt": "x", "negative_prompt": "blue \udfff"}, "negative_prompt"),
])
def test_wrong_types_and_near_miss_values_are_400s(server, body, param):
    _, http = server
    r = http.post("/v1/images/generations", content=__import__("json").dumps(body).encode(),
                  headers={"content-type": "application/json"})
    _openai_error(r, 400, param)


def test_the_accepted_neighbours_of_those_values_generate(server):
    _, http = server
    body = {"prompt": "a red circle on a blue background", "user": "u1", "model": "tiny", "response_format": None,
            "size": "64x64", "steps": 2, "negative_prompt": "\u00e9\u4e2d\U0001f600"}
    r = http.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 1


@pytest.mark.parametrize("method,path,status,code", [
    ("GET", "/nope", 404, "not_found"), ("POST", "/v1/images/variations", 404, "not_found"),
    ("GET", "/v1/images/edits", 405, "method_not_allowed"),
    ("GET", "/v1/images/generations", 405, "method_not_allowed"), ("POST", "/health", 405, "method_not_allowed"),
    ("DELETE", "/v1/models", 405, "method_not_allowed"),
])
def test_unknown_paths_and_methods_answer_in_the_openai_error_shape(server, method, path, status, code):
    _, http = server
    err = _openai_error(http.request(method, path), status)
    assert err["code"] == code and err["type"] == "invalid_request_error"


def test_models_lists_the_served_model_for_openai_clients(server, tiny_pipe):
    url, http = server
    r = http.get("/v1/models")
    assert r.status_code == 200
    assert r.json() == {"object": "list", "data": [{"id": tiny_pipe.info.name, "object": "model", "created": 0,
                                                   "owned_by": "sdfast"}]}
    models = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0).models.list()
    assert [m.id for m in models.data] == [tiny_pipe.info.name]
    _openai_error(httpx.get(f"{url}/v1/models"), 401)  # behind the key like the rest of /v1
