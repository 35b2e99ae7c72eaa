"""Near misses of the server's guards and the manifest's path checks: each refusal sits next to the
closest input that must pass, so a guard that is too loose (a prefix of the key, a body that is
only measured when it says how long it is, a sibling folder sharing the export's name) and one
that is too tight (a key sent with two spaces, a body of exactly the limit) both show.

The server here wraps a stand-in service (no model): authorization and the body limit are decided
before a request reaches the pipeline. Most requests are driven straight through ASGI so every
header byte and body chunk is exactly what the test says; a few go over loopback through uvicorn
to show the same holds for what a real client sends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from sdfast.artifacts import MANIFEST, Manifest, inside, read_manifest  # noqa: E402
from sdfast.errors import ArtifactMismatch, InvalidArgument  # noqa: E402
from sdfast.export.base import check_export_out  # noqa: E402
from sdfast.model.components import ShapeProfile  # noqa: E402
from sdfast.serve import ServeConfig, create_app  # noqa: E402
from sdfast.serve.app import BackgroundServer  # noqa: E402
from sdfast.serve.metrics import ServeMetrics  # noqa: E402

KEY = "s3cret-K3y"
#: the body limit the server documents: 1 MiB ("a prompt and a few numbers").
LIMIT = 1 << 20


class FakeService:
    """What create_app needs of an ImageService, with no pipeline: ``parse`` records the decoded
    body it was handed and every accepted request answers with one fixed PNG."""

    def __init__(self, api_key: str | None = None):
        self.config = ServeConfig(api_key=api_key)
        self.metrics = ServeMetrics()
        self.info = SimpleNamespace(name="fake-model")
        self.ready, self.state, self.state_detail = True, "ready", ""
        self.parsed: list = []

    def start(self) -> None:
        pass

    def drain(self, timeout=None) -> bool:
        return True

    def health(self) -> dict:
        return {"status": self.state}

    def parse(self, body):
        self.parsed.append(body)
        return body

    def partial_images(self, body) -> None:
        return None  # never streamed

    def submit(self, req):
        f = concurrent.futures.Future()
        f.set_result(SimpleNamespace(output=None, batch_requests=1, batch_images=1))
        return f

    def pngs(self, output) -> list[bytes]:
        return [b"\x89PNG fake"]


class Sent(SimpleNamespace):
    status: int
    body: dict
    pulled: int  # body chunks the app asked for


def call(app, method: str, path: str, headers: list[tuple[bytes, bytes]] = (), chunks=(),
         query: bytes = b"") -> Sent:
    """One ASGI request with exactly these header bytes and body chunks (the last one ends the
    body); ``pulled`` counts how many chunks the app read before it answered."""
    chunks = list(chunks)
    state = {"pulled": 0}

    async def receive():
        i = state["pulled"]
        if i < len(chunks):
            state["pulled"] += 1
            return {"type": "http.request", "body": chunks[i], "more_body": i + 1 < len(chunks)}
        if not chunks and i == 0:
            state["pulled"] += 1
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(3600)  # the client waits for the answer; it sends nothing more

    out: dict = {"body": b""}

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
            out["headers"] = {k.decode().lower(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
             "root_path": "", "headers": list(headers), "client": ("127.0.0.1", 50000),
             "server": ("127.0.0.1", 8000)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 60))
    is_json = out["headers"].get("content-type", "").startswith("application/json")
    return Sent(status=out["status"], body=json.loads(out["body"]) if is_json else out["body"], headers=out["headers"],
                pulled=state["pulled"])


def app_with(key: str | None = KEY) -> tuple:
    service = FakeService(api_key=key)
    return create_app(service), service


# -- the API key ------------------------------------------------------------------------------

ACCEPTED_AUTH = [
    f"Bearer {KEY}".encode(),
    f"bearer {KEY}".encode(),  # the scheme is case-insensitive (RFC 7235)
    f"BEARER {KEY}".encode(),
    f"Bearer  {KEY}".encode(),  # 1*SP between scheme and token (RFC 6750)
    f"Bearer {KEY} ".encode(),  # trailing whitespace is not part of a header value
    f"Bearer {KEY}\t".encode(),
]

REFUSED_AUTH = [
    f"Bearer {KEY}x".encode(),  # one character appended
    f"Bearer {KEY}{KEY}".encode(),
    f"Bearer {KEY[:-1]}".encode(),  # one removed: a prefix of the key
    f"Bearer {KEY[1:]}".encode(),  # a suffix of the key
    f"Bearer {KEY[:1]}".encode(),
    f"Bearer {KEY.upper()}".encode(),  # the key itself is case-sensitive
    f"Bearer {KEY.lower()}".encode(),
    f"Bearer {KEY.swapcase()}".encode(),
    f"Bearer {KEY[:3]}X{KEY[4:]}".encode(),  # one character changed
    f"Bearer {KEY} {KEY}".encode(),
    f"Bearer {KEY}\x00".encode(),
    f"Bearer {KEY}\xe9".encode("latin-1"),
    KEY.encode(),  # the key without a scheme
    f"{KEY} {KEY}".encode(),
    f"Bearer{KEY}".encode(),  # no space
    f"Baerer {KEY}".encode(),  # misspelt
    f"Beare {KEY}".encode(),
    f"Bearerr {KEY}".encode(),
    f"xBearer {KEY}".encode(),
    f"Basic {KEY}".encode(),  # another scheme
    f"Token {KEY}".encode(),
    b"Bearer",  # empty bearer
    b"Bearer ",
    b"Bearer    ",
    b"",
]


#: the API routes a configured key guards: one read, one that would run the service.
KEYED_ROUTES = [("GET", "/v1/models"), ("POST", "/v1/images/generations")]


@pytest.mark.parametrize("value", ACCEPTED_AUTH, ids=repr)
@pytest.mark.parametrize("method,path", KEYED_ROUTES)
def test_the_key_in_a_bearer_header_is_accepted(value, method, path):
    app, service = app_with()
    r = call(app, method, path, [(b"authorization", value)], [b'{"prompt": "x"}'])
    assert r.status == 200, r.body
    if method == "POST":
        assert service.parsed == [{"prompt": "x"}]
    else:
        assert r.body["data"][0]["id"] == "fake-model"


@pytest.mark.parametrize("value", REFUSED_AUTH, ids=repr)
@pytest.mark.parametrize("method,path", KEYED_ROUTES)
def test_near_misses_of_the_key_are_401_and_never_reach_the_service(value, method, path):
    app, service = app_with()
    r = call(app, method, path, [(b"authorization", value)], [b'{"prompt": "x"}'])
    assert r.status == 401, r.body
    assert r.body["error"]["code"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
    assert service.parsed == []


@pytest.mark.parametrize("headers,query", [
    ([(b"x-api-key", KEY.encode())], b""),
    ([(b"api-key", KEY.encode())], b""),  # Azure OpenAI's header
    ([(b"proxy-authorization", f"Bearer {KEY}".encode())], b""),
    ([(b"cookie", f"authorization=Bearer {KEY}".encode())], b""),
    ([(b"x-authorization", f"Bearer {KEY}".encode())], b""),
    ([], f"api_key={KEY}".encode()),
    ([], f"authorization=Bearer%20{KEY}".encode()),
])
def test_the_key_in_any_other_header_or_the_query_is_401(headers, query):
    app, service = app_with()
    for method, path in KEYED_ROUTES:
        r = call(app, method, path, headers, [b'{"prompt": "x"}'], query=query)
        assert r.status == 401, (method, r.body)
    assert service.parsed == []


def test_the_first_of_two_authorization_headers_decides():
    app, _ = app_with()
    right, wrong = f"Bearer {KEY}".encode(), f"Bearer {KEY}x".encode()
    assert call(app, "GET", "/v1/models", [(b"authorization", right), (b"authorization", wrong)]).status == 200
    assert call(app, "GET", "/v1/models", [(b"authorization", wrong), (b"authorization", right)]).status == 401


def test_without_a_key_configured_every_header_is_let_through():
    app, _ = app_with(key=None)
    for value in (b"", b"Bearer", f"Basic {KEY}".encode()):
        assert call(app, "GET", "/v1/models", [(b"authorization", value)]).status == 200


def test_probes_need_no_key_but_the_api_does():
    app, _ = app_with()
    assert call(app, "GET", "/health").status == 200
    assert call(app, "GET", "/metrics").status == 200
    assert call(app, "GET", "/v1/models").status == 401


@pytest.mark.parametrize("extra", [b"\xa0", b"\x85"])
def test_the_key_with_a_non_ascii_space_appended_is_401(extra):
    app, _ = app_with()
    assert call(app, "GET", "/v1/models", [(b"authorization", f"Bearer {KEY}".encode() + extra)]).status == 401


@pytest.fixture(scope="module")
def live():
    """A real uvicorn on loopback around the stand-in service (key KEY)."""
    service = FakeService(api_key=KEY)
    with BackgroundServer(create_app(service)) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield http, service


def test_over_the_wire_only_the_exact_key_passes(live):
    http, _ = live
    for value, status in ((f"Bearer {KEY}", 200), (f"Bearer  {KEY}", 200), (f"bearer {KEY}", 200),
                          (f"Bearer {KEY}x", 401), (f"Bearer {KEY[:-1]}", 401), (f"Bearer {KEY.upper()}", 401),
                          (KEY, 401), (f"Bearer{KEY}", 401), ("Bearer", 401)):
        r = http.get("/v1/models", headers={"Authorization": value})
        assert r.status_code == status, (value, r.text)
    assert http.get("/v1/models", headers={"X-API-Key": KEY}).status_code == 401


def test_over_the_wire_the_key_with_a_non_ascii_space_appended_is_401(live):
    http, _ = live
    assert http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}".encode() + b"\xa0"}).status_code == 401


# -- the body limit ---------------------------------------------------------------------------

def padded(n: int) -> bytes:
    """A valid JSON generation body of exactly ``n`` bytes (spaces pad it)."""
    head = b'{"prompt": "x"}'
    return head + b" " * (n - len(head))


def split(data: bytes, size: int = 64 << 10) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def post(app, body_chunks, content_length: bytes | None = None) -> Sent:
    headers = [(b"content-type", b"application/json")]
    if content_length is not None:
        headers.append((b"content-length", content_length))
    return call(app, "POST", "/v1/images/generations", headers, body_chunks)


def too_large(r: Sent) -> bool:
    return r.status == 413 and r.body["error"]["code"] == "payload_too_large" \
        and r.body["error"]["message"].startswith(f"body: at most {LIMIT} bytes")


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "streamed"])
def test_a_body_of_exactly_the_limit_is_read_whole(with_length):
    app, service = app_with(key=None)
    body = padded(LIMIT)
    r = post(app, split(body), str(LIMIT).encode() if with_length else None)
    assert r.status == 200, r.body
    assert service.parsed == [{"prompt": "x"}]


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "streamed"])
def test_one_byte_over_the_limit_is_413(with_length):
    app, service = app_with(key=None)
    r = post(app, split(padded(LIMIT + 1)), str(LIMIT + 1).encode() if with_length else None)
    assert too_large(r), r.body
    assert service.parsed == []


def test_a_streamed_body_over_the_limit_is_refused_while_it_arrives():
    # No Content-Length (a chunked upload): the server counts what arrives and stops reading at
    # the first chunk past the limit, however much more the client would send.
    app, service = app_with(key=None)
    chunk = 64 << 10
    endless = split(padded(16 * LIMIT), chunk)
    r = post(app, endless)
    assert too_large(r), r.body
    assert r.pulled == LIMIT // chunk + 1  # 16 chunks fill the limit exactly; the 17th is one too many
    assert service.parsed == []


@pytest.mark.parametrize("chunk", [1000, 4096, 100_000])
def test_the_limit_counts_bytes_whatever_the_chunking(chunk):
    app, _ = app_with(key=None)
    over = [b"x" * chunk] * (LIMIT // chunk + 1)
    r = post(app, over)
    assert too_large(r) and r.pulled == LIMIT // chunk + 1


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    app, service = app_with(key=None)
    for declared in (LIMIT + 1, 10 * LIMIT, 10**30):
        r = post(app, [b'{"prompt": "x"}'], str(declared).encode())
        assert too_large(r) and r.pulled == 0, (declared, r.body)
    assert service.parsed == []


@pytest.mark.parametrize("declared", [b"10", b"0", str(LIMIT).encode()])
def test_a_content_length_smaller_than_the_body_does_not_lift_the_limit(declared):
    app, service = app_with(key=None)
    r = post(app, split(padded(LIMIT + 1)), declared)
    assert too_large(r), r.body
    assert service.parsed == []


@pytest.mark.parametrize("declared", [b"-1", b"+2000000", b"1e9", b" 2000000", b"abc", b"0x200000", b""])
def test_an_unparsable_content_length_falls_back_to_counting(declared):
    app, service = app_with(key=None)
    assert too_large(post(app, split(padded(LIMIT + 1)), declared))
    small = post(app, [b'{"prompt": "x"}'], declared)
    assert small.status == 200 and service.parsed == [{"prompt": "x"}]


def test_over_the_wire_a_chunked_body_is_held_to_the_limit(live):
    http, service = live
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    before = len(service.parsed)

    def chunked(data: bytes):
        yield from split(data)  # a generator: httpx sends Transfer-Encoding: chunked, no Content-Length

    r = http.post("/v1/images/generations", content=chunked(padded(LIMIT)), headers=auth)
    assert r.status_code == 200, r.text
    assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
    r = http.post("/v1/images/generations", content=chunked(padded(LIMIT + 1)), headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert len(service.parsed) == before + 1


# -- paths a manifest lists -------------------------------------------------------------------

@pytest.fixture
def export(tmp_path):
    """An export folder ``eng`` beside a sibling whose name starts the same (``eng-evil``)."""
    root = tmp_path / "eng"
    (root / "sub").mkdir(parents=True)
    (root / "unet.onnx").write_bytes(b"graph")
    (root / "..x.onnx").write_bytes(b"dots")
    (root / "sub" / "..hidden").write_bytes(b"dots")
    evil = tmp_path / "eng-evil"
    evil.mkdir()
    (evil / "unet.onnx").write_bytes(b"graph")
    return root


@pytest.mark.parametrize("rel", ["unet.onnx", "./unet.onnx", "sub/..hidden", "..x.onnx", "x..onnx",
                                 "sub/./..hidden", "sub/not-yet-written.onnx", "a..b/c"])
def test_names_with_dots_that_stay_inside_are_inside(export, rel):
    p = inside(export, rel)
    assert p is not None and p.is_relative_to(export.resolve()) and p != export.resolve()


@pytest.mark.parametrize("rel", ["..", "../eng-evil/unet.onnx", "./../eng-evil/unet.onnx", "sub/../../eng-evil/unet.onnx",
                                 "sub/../..", "..\\eng-evil\\unet.onnx", "sub\\..\\..\\x", "unet.onnx\\..\\..\\x",
                                 "/etc/hostname", "//etc/hostname", ".", "./", "sub/..", ""])
def test_parent_absolute_backslash_and_the_root_itself_are_not_inside(export, rel):
    assert inside(export, rel) is None


def test_absolute_paths_into_the_folder_itself_are_still_refused(export):
    assert inside(export, str(export / "unet.onnx")) is None


def test_symlinks_are_judged_by_where_they_lead(export, tmp_path):
    (export / "in.onnx").symlink_to(export / "unet.onnx")  # inside: fine
    (export / "rel.onnx").symlink_to("sub/..hidden")
    (export / "sibling.onnx").symlink_to(tmp_path / "eng-evil" / "unet.onnx")  # shares the name's prefix
    (export / "up.onnx").symlink_to("../eng-evil/unet.onnx")
    (export / "chain.onnx").symlink_to(export / "up.onnx")  # inside → a link that leaves
    (export / "dir").symlink_to(tmp_path / "eng-evil", target_is_directory=True)
    (export / "self").symlink_to(export, target_is_directory=True)
    assert inside(export, "in.onnx") == (export / "unet.onnx").resolve()
    assert inside(export, "rel.onnx") == (export / "sub" / "..hidden").resolve()
    assert inside(export, "self/unet.onnx") == (export / "unet.onnx").resolve()
    for rel in ("sibling.onnx", "up.onnx", "chain.onnx", "dir/unet.onnx", "dir", "self"):
        assert inside(export, rel) is None, rel


def test_an_export_folder_reached_through_a_symlink_is_still_itself(export, tmp_path):
    link = tmp_path / "link-to-eng"
    link.symlink_to(export, target_is_directory=True)
    assert inside(link, "unet.onnx") == (export / "unet.onnx").resolve()
    assert inside(link, "../eng/unet.onnx") is None


def write_manifest(root, rel: str, files: dict | None = None) -> None:
    m = Manifest(format="onnx", model={"fingerprint": "f", "name": "tiny"}, profile=ShapeProfile.static(1, 64, 64),
                 components={"unet": {"file": rel, "precision": "fp32", "inputs": {}, "outputs": {}}},
                 files=files if files is not None else {rel: {"sha256": "0" * 64, "size": 5}})
    (root / MANIFEST).write_text(m.to_json())


@pytest.mark.parametrize("rel", ["unet.onnx", "sub/..hidden", "..x.onnx"])
def test_a_manifest_listing_its_own_files_is_read(export, rel):
    write_manifest(export, rel)
    assert read_manifest(export).components["unet"]["file"] == rel


@pytest.mark.parametrize("rel", ["../eng-evil/unet.onnx", "..\\eng-evil\\unet.onnx", "//etc/hostname", "sub/..", "."])
@pytest.mark.parametrize("where", ["component", "files"])
def test_a_manifest_naming_a_path_outside_is_refused(export, rel, where):
    if where == "component":
        write_manifest(export, rel, files={})
    else:  # the component is fine; a hashed file listed beside it is not
        write_manifest(export, "unet.onnx", files={"unet.onnx": {"sha256": "0" * 64, "size": 5},
                                                    rel: {"sha256": "0" * 64, "size": 5}})
    with pytest.raises(ArtifactMismatch, match="which is outside") as e:
        read_manifest(export)
    assert repr(rel) in str(e.value) and "\n" not in str(e.value)


def test_a_manifest_whose_listed_file_is_a_symlink_to_a_sibling_is_refused(export, tmp_path):
    (export / "unet.onnx").unlink()
    (export / "unet.onnx").symlink_to(tmp_path / "eng-evil" / "unet.onnx")
    write_manifest(export, "unet.onnx")
    with pytest.raises(ArtifactMismatch, match="outside"):
        read_manifest(export)


# -- where an export may be written -----------------------------------------------------------

@pytest.fixture
def model(tmp_path, monkeypatch):
    model = tmp_path / "models" / "sd"
    model.mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return model


@pytest.mark.parametrize("name", ["sd-engines", "s", "sdx", "engines"])
def test_folders_beside_the_model_whose_names_share_its_prefix_are_allowed(model, name):
    out = model.parent / name
    assert check_export_out(out, protect=model) == out.resolve()


@pytest.mark.parametrize("make", [
    lambda model: model,
    lambda model: model / ".." / "sd",
    lambda model: model / "..",
    lambda model: model.parent.parent,
    lambda model: model.parent / "." / "sd" / ".",
])
def test_the_model_folder_and_what_holds_it_are_refused_however_spelt(model, make):
    with pytest.raises(InvalidArgument, match="^out: .*model folder or contains it"):
        check_export_out(make(model), protect=model)


def test_a_symlink_to_the_model_or_its_parent_is_refused(model, tmp_path):
    for name, target in (("to-model", model), ("to-models", model.parent)):
        link = tmp_path / name
        link.symlink_to(target, target_is_directory=True)
        with pytest.raises(InvalidArgument, match="model folder or contains it"):
            check_export_out(link, protect=model)


def test_the_current_folder_is_refused_but_its_prefix_siblings_are_not(model, tmp_path):
    cwd = tmp_path / "work"
    for out in (".", cwd, cwd / "x" / ".."):
        with pytest.raises(InvalidArgument, match="current folder"):
            check_export_out(out)
    assert check_export_out(tmp_path / "work-engines") == (tmp_path / "work-engines").resolve()
    assert check_export_out("engines") == (cwd / "engines").resolve()
