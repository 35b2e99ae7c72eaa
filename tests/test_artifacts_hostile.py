"""Malformed and hostile artifact folders are refused in one line.

The manifest is checked against its schema before anything in it is used, every path it lists
must stay inside the folder after symlinks, and each engine's real I/O is checked against the
component spec, so a swapped or foreign file whose hash was fixed in the manifest is refused too.
"""

from __future__ import annotations

import json
import shutil

import pytest
from adversarial import refused

import sdfast
from sdfast.artifacts import MANIFEST, Manifest, read_manifest
from sdfast.errors import ArtifactMismatch, InvalidArgument, MissingFile

pytest.importorskip("onnxruntime")


@pytest.fixture
def eng(onnx_copy):
    return onnx_copy


def edit(root, fn) -> None:
    m = json.loads((root / MANIFEST).read_text())
    fn(m)
    (root / MANIFEST).write_text(json.dumps(m))


def reseal(root) -> None:
    """Recompute every hash, as an attacker who swapped a file would."""
    read_manifest(root).seal(root)


def load(info, root, **kw):
    return sdfast.load(info.path, backend="onnxruntime", engines=root, **kw)


@pytest.mark.parametrize("doc,needle", [
    ([], "top level is list"),
    (None, "top level is NoneType"),
    ("x", "top level is str"),
    ({}, "key 'format_version' is missing"),
])
def test_a_manifest_that_is_not_an_object_is_refused(tiny_info, eng, doc, needle):
    (eng / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(ArtifactMismatch, match=needle):
        load(tiny_info, eng)


@pytest.mark.parametrize("mutate,needle", [
    (lambda m: m["files"].update({"unet.onnx": "abc"}), "files['unet.onnx'] is not an object"),
    (lambda m: m["components"]["unet"].pop("precision"), "components.unet.precision is None"),
    (lambda m: m["components"]["unet"].update(precision="fp64"), "components.unet.precision is 'fp64'"),
    (lambda m: m.update(components=list(m["components"])), "'components' is list, not dict"),
    (lambda m: m["profile"].pop("max_height"), "profile.max_height is None"),
    (lambda m: m["profile"].update(min_batch=-1), "profile.min_batch is -1"),
    (lambda m: m["profile"].update(opt_width="64"), "profile.opt_width is '64'"),
    (lambda m: m.update(format_version="1"), "'format_version' is str, not int"),
    (lambda m: m["components"]["unet"].update(file=7), "components.unet.file is missing or not a string"),
    (lambda m: m["model"].pop("fingerprint"), "model.fingerprint is missing"),
    (lambda m: m.update(versions=["torch"]), "'versions' is list"),
    (lambda m: m.update(device="H100"), "'device' is str"),
    (lambda m: m["files"]["unet.onnx"].update(size="big"), "files['unet.onnx'] is not an object"),
])
def test_schema_violations_are_one_line_naming_the_key(tiny_info, eng, mutate, needle):
    edit(eng, mutate)
    with pytest.raises(ArtifactMismatch, match="not an sdfast manifest") as e:
        load(tiny_info, eng)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert "rebuild with: sdfast export" in str(e.value)


def test_an_unreadable_manifest_is_one_line(tiny_info, eng):
    (eng / MANIFEST).write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ArtifactMismatch, match="not valid JSON"):
        load(tiny_info, eng)


@pytest.mark.parametrize("rel", ["../other/unet.onnx", "/etc/hostname", "sub/../../x.onnx", ""])
def test_component_files_outside_the_folder_are_refused(tiny_info, eng, tmp_path, rel):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(eng / "unet.onnx", other / "unet.onnx")

    def point(m):
        m["components"]["unet"]["file"] = rel
        m["files"][rel] = m["files"]["unet.onnx"]  # "fixed" so the hash check would pass

    edit(eng, point)
    with pytest.raises(ArtifactMismatch, match="outside") as e:
        load(tiny_info, eng)
    assert "bytes" not in str(e.value)  # nothing about the outside file (its size) is revealed


def test_a_symlink_out_of_the_folder_is_refused(tiny_info, eng, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.move(eng / "unet.onnx", outside)
    (eng / "unet.onnx").symlink_to(outside)  # same bytes, same hash: only the path gives it away
    with pytest.raises(ArtifactMismatch, match="outside"):
        load(tiny_info, eng)


def test_external_data_pointing_outside_is_one_line(tiny_info, eng, tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto

    model = onnx.load(eng / "vae_decoder.onnx")
    w = max(model.graph.initializer, key=lambda t: len(t.raw_data))  # a weight the graph uses
    (tmp_path / "secret.bin").write_bytes(w.raw_data)
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", str(tmp_path.joinpath("secret.bin")
                                                                                .stat().st_size))):
        w.external_data.add(key=k, value=v)
    (eng / "vae_decoder.onnx").write_bytes(model.SerializeToString())
    reseal(eng)
    with pytest.raises(ArtifactMismatch, match="ONNX Runtime cannot open .*vae_decoder.onnx") as e:
        load(tiny_info, eng)
    assert "\n" not in str(e.value)


def test_a_decoder_encoder_swap_with_fixed_hashes_is_refused(tiny_info, eng):
    dec, enc = eng / "vae_decoder.onnx", eng / "vae_encoder.onnx"
    tmp = eng / "swap"
    dec.rename(tmp)
    enc.rename(dec)
    tmp.rename(enc)
    reseal(eng)
    with pytest.raises(ArtifactMismatch, match=r"vae_decoder.onnx has inputs \['image'\] but vae_decoder has "
                                               r"\['latent'\] \(a swapped or foreign file\)"):
        load(tiny_info, eng)


def _identity_unet(path, hidden: int) -> None:
    """A foreign 'U-Net' with the right names but another text width (say, another model's)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    t = TensorProto.FLOAT
    ins = [helper.make_tensor_value_info("sample", t, ["B", 4, "h", "w"]),
           helper.make_tensor_value_info("timestep", t, [1]),
           helper.make_tensor_value_info("encoder_hidden_states", t, ["B", 77, hidden])]
    out = helper.make_tensor_value_info("noise_pred", t, ["B", 4, "h", "w"])
    graph = helper.make_graph([helper.make_node("Identity", ["sample"], ["noise_pred"])], "foreign", ins, [out])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_a_foreign_unet_with_a_fixed_hash_is_refused(tiny_info, eng):
    _identity_unet(eng / "unet.onnx", hidden=64)
    reseal(eng)
    with pytest.raises(ArtifactMismatch, match=r"encoder_hidden_states has size 64 on axis 2 \(D\) but the model "
                                               r"and profile need 32"):
        load(tiny_info, eng)
    _identity_unet(eng / "unet.onnx", hidden=32)  # the same I/O: the check lets it through (by design)
    reseal(eng)
    assert load(tiny_info, eng).engines["unet"].spec.name == "unet"


def test_a_widened_profile_is_refused(tiny_info, onnx_fp16, tmp_path):
    eng = tmp_path / "static"
    shutil.copytree(onnx_fp16, eng)
    edit(eng, lambda m: m["profile"].update(max_batch=4))  # the graphs were built for batch 1
    with pytest.raises(ArtifactMismatch, match="is fixed at 1 on axis 0 .*spans 1..4 .*widened profile"):
        load(tiny_info, eng, dtype="fp16")


def test_an_edited_precision_is_refused(tiny_info, eng):
    def fp16(m):
        for c in m["components"].values():
            c["precision"] = "fp16"

    edit(eng, fp16)
    with pytest.raises(ArtifactMismatch, match="is float32 but the manifest says float16"):
        load(tiny_info, eng, dtype="fp16")


def test_dtype_hints_suggest_what_exists(tiny_info, onnx_dynamic):
    with pytest.raises(InvalidArgument) as e:
        load(tiny_info, onnx_dynamic, dtype="bf16")
    msg = str(e.value)
    assert "pass --dtype fp32" in msg and "--precision bf16" not in msg  # export cannot build bf16
    with pytest.raises(InvalidArgument, match="or export again with --precision fp16"):
        load(tiny_info, onnx_dynamic, dtype="fp16")


def test_the_rebuild_hint_names_the_format_of_the_backend_asked_for(tiny_info, onnx_dynamic):
    with pytest.raises(ArtifactMismatch) as e:
        sdfast.load(tiny_info.path, backend="inductor", engines=onnx_dynamic)
    msg = str(e.value)
    assert "holds onnx artifacts, not inductor" in msg and "use --backend onnxruntime" in msg
    assert "--format inductor" in msg and "--format onnx" not in msg


def test_cli_tampering_cases_exit_2_with_one_line(tiny_info, eng, tmp_path, capsys):
    argv = ["generate", "x", "--model", str(tiny_info.path), "--engines", str(eng), "--steps", "1",
            "--out", str(tmp_path / "o.png")]
    (eng / MANIFEST).write_text("null")
    refused(capsys, argv, "not an sdfast manifest")
    (eng / MANIFEST).unlink()
    refused(capsys, argv, "has no manifest.json")
    shutil.rmtree(eng)
    refused(capsys, argv, "no folder at")
    assert not (tmp_path / "o.png").exists()


def test_a_manifest_round_trips_through_the_schema(tiny_info, onnx_dynamic):
    m = read_manifest(onnx_dynamic)
    again = Manifest.from_dict(json.loads(m.to_json()))
    assert again == m


def test_legacy_aoti_format_reads_as_inductor(eng):
    edit(eng, lambda m: m.update(format="aoti"))
    assert read_manifest(eng).format == "inductor"


def test_missing_folder_is_missing_file(tiny_info, tmp_path):
    with pytest.raises(MissingFile, match="no folder at"):
        load(tiny_info, tmp_path / "nope")


class _Runner:
    """Stands in for an AOTInductor package (compiling a real one takes minutes on the CPU)."""

    def __init__(self, metadata: dict[str, str], n_in: int = 1, n_out: int = 1):
        from torch.utils import _pytree as pytree

        self._meta = metadata
        ins = pytree.tree_flatten(((0,) * n_in, {}))[1]
        outs = pytree.tree_flatten((0,) * n_out)[1]
        self.loader = type("L", (), {"get_call_spec": lambda s: [pytree.treespec_dumps(ins),
                                                                 pytree.treespec_dumps(outs)]})()

    def get_metadata(self) -> dict[str, str]:
        return self._meta


def test_an_inductor_package_of_another_component_is_refused(tiny_info, eng):
    from sdfast.engines.inductor import check_package
    from sdfast.export.inductor import package_metadata
    from sdfast.model.components import SPECS

    m = read_manifest(eng)
    m.format = "inductor"
    check_package(_Runner(package_metadata(SPECS["vae_decoder"])), m, eng, tiny_info, "vae_decoder")
    with pytest.raises(ArtifactMismatch, match="is the package of vae_encoder .*not vae_decoder .*swapped"):
        check_package(_Runner(package_metadata(SPECS["vae_encoder"])), m, eng, tiny_info, "vae_decoder")
    # A package without sdfast's metadata is held to the spec's input and output counts.
    check_package(_Runner({}, n_in=3, n_out=1), m, eng, tiny_info, "unet")
    with pytest.raises(ArtifactMismatch, match="takes 1 input.*but unet takes 3"):
        check_package(_Runner({}, n_in=1, n_out=1), m, eng, tiny_info, "unet")
