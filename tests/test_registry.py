"""Dataset registry: hashes, mirror lookup, offline-testable downloads (file:// and local HTTP), CLI."""

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from dipuq.cli import main
from dipuq.data.loaders import open_dataset
from dipuq.data.registry import DATASETS, DataFile, Dataset, fetch, get, sha256sum
from dipuq.errors import DataError


def _toy(tmp_path: Path, base_url: str | None = None, corrupt: str | None = None) -> Dataset:
    """A two-file dataset whose source folder is tmp_path/src; ``corrupt`` names a file given a wrong hash."""
    src = tmp_path / "src"
    (src / "toy" / "sub").mkdir(parents=True, exist_ok=True)
    files = {"toy/a.txt": b"alpha\n", "toy/sub/b.bin": bytes(range(256)) * 10}
    out = []
    for rel, data in files.items():
        (src / rel).write_bytes(data)
        sha = hashlib.sha256(data + (b"x" if rel == corrupt else b"")).hexdigest()
        out.append(DataFile(rel, f"{base_url or src.as_uri()}/{rel}", sha))
    return Dataset(name="toy", title="toy", kind="test", entry="toy", loader="tiff", files=tuple(out),
                   size=sum(map(len, files.values())), licence="CC0", citation="-", source="-")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".part")


# -- the registry's own facts ---------------------------------------------------------------------
def test_registry_hashes_match_the_mirror_sums(shared_data):
    sums = dict(reversed(line.split()) for line in (shared_data / "SHA256SUMS").read_text().splitlines() if line)
    listed = {f.path: f.sha256 for d in DATASETS.values() for f in d.files}
    assert listed == sums  # every mirrored file is registered, with the same hash
    for d in DATASETS.values():
        assert d.size == sum((shared_data / f.path).stat().st_size for f in d.files)
        for f in d.files:
            assert f.url.startswith("https://raw.githubusercontent.com/")
    assert "2c94ed18a06f7908b018c6f8e43d320f8a8488f2" in get("tooth").files[0].url
    assert all("0dad8303fe51a5ea71b977ed664eafe10b540361/test_data/data/image_test/" in f.url
               for f in get("diamond-24737").files)
    assert any(f.url.endswith("image_test/tiffs/raw_00090.tiff") for f in get("diamond-24737").files)
    # the newer entries: repository + commit of PROVENANCE.md, files under the same relative paths
    assert [f.url for f in get("psi-wood").files] == [
        "https://raw.githubusercontent.com/neutronimaging/imagingsuite/6a99fe83d2fb40187589f54a564b5ba0d7a4e1ea"
        f"/frameworks/tomography/data/woodsino_0200.{ext}" for ext in ("tif", "txt")]
    assert get("liquidet-n6").files[0].url == (
        "https://raw.githubusercontent.com/ajinkyakadu/LiquidET_NatComm2024/c03a422e5345df496b64ec29a344a689ee4bbbfd"
        "/data/N6/N6_liquid_sample_stack.mat")
    k11 = "https://raw.githubusercontent.com/DiamondLightSource/httomo/f766bda7e856d0bb2cba317f6e99a5dc709ad1be/tests/test_data/k11_diad/"
    assert [f.url for f in get("diamond-k11").files] == [
        k11 + rel for rel in ("k11-18014.nxs", "k11-18014/k11-18014-imaging.h5", "k11-18014/k11-18014-pcompPanda.h5")]
    assert all(f.url.endswith(f.path.split("/", 1)[1]) for f in get("diamond-k11").files)  # links resolve in the cache


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'nope': available: tooth, diamond-24737, psi-wood, liquidet-n6, diamond-k11"):
        fetch("nope")


# -- mirror ---------------------------------------------------------------------------------------
def test_mirror_from_env_and_argument(tmp_path, monkeypatch):
    ds = _toy(tmp_path)
    monkeypatch.setenv("DIPUQ_DATA_MIRROR", str(tmp_path / "src"))
    monkeypatch.setenv("DIPUQ_CACHE", str(tmp_path / "cache"))
    assert fetch(ds) == tmp_path / "src" / "toy"
    monkeypatch.delenv("DIPUQ_DATA_MIRROR")
    assert fetch(ds, mirror=tmp_path / "src") == tmp_path / "src" / "toy"
    assert not (tmp_path / "cache").exists()  # nothing downloaded


def test_corrupt_mirror_is_an_error_and_untouched(tmp_path):
    ds = _toy(tmp_path, corrupt="toy/sub/b.bin")
    with pytest.raises(DataError, match=r"mirror file .*b\.bin has SHA-256"):
        fetch(ds, mirror=tmp_path / "src", cache_dir=tmp_path / "cache")
    assert (tmp_path / "src" / "toy" / "sub" / "b.bin").is_file()


# -- downloads ------------------------------------------------------------------------------------
def test_download_file_url_verifies_and_caches(tmp_path, monkeypatch):
    monkeypatch.delenv("DIPUQ_DATA_MIRROR", raising=False)
    ds = _toy(tmp_path)
    out = fetch(ds, cache_dir=tmp_path / "cache")
    assert out == tmp_path / "cache" / "toy"
    assert (out / "sub" / "b.bin").read_bytes() == (tmp_path / "src" / "toy" / "sub" / "b.bin").read_bytes()
    assert _leftovers(tmp_path / "cache") == []
    # a corrupted cached copy is detected and downloaded again
    (out / "a.txt").write_text("tampered")
    fetch(ds, cache_dir=tmp_path / "cache")
    assert (out / "a.txt").read_text() == "alpha\n"
    # a mirror that lacks files falls back to the cache
    assert fetch(ds, cache_dir=tmp_path / "cache", mirror=tmp_path / "empty") == out


def test_download_with_wrong_hash_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("DIPUQ_DATA_MIRROR", raising=False)
    ds = _toy(tmp_path, corrupt="toy/sub/b.bin")
    with pytest.raises(DataError, match=r"b\.bin has SHA-256 .* expected .*discarded"):
        fetch(ds, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "toy" / "sub" / "b.bin").exists()
    assert (tmp_path / "cache" / "toy" / "a.txt").is_file()  # the good file is kept
    assert _leftovers(tmp_path / "cache") == []


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("DIPUQ_DATA_MIRROR", raising=False)
    ds = _toy(tmp_path, base_url=(tmp_path / "missing").as_uri())
    with pytest.raises(DataError, match="cannot download .*DIPUQ_DATA_MIRROR") as err:
        fetch(ds, cache_dir=tmp_path / "cache")
    assert "\n" not in str(err.value) and _leftovers(tmp_path / "cache") == []


@pytest.fixture
def http_mirror(shared_data):
    """A local HTTP server serving the real-data mirror (no internet)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shared_data))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_download_of_the_real_tooth(tmp_path, http_mirror, monkeypatch):
    """The registered tooth, its URL pointed at a local server: the real SHA-256 is verified."""
    monkeypatch.delenv("DIPUQ_DATA_MIRROR", raising=False)
    tooth = get("tooth")
    f = tooth.files[0]
    local = Dataset(**{**tooth.__dict__, "files": (DataFile(f.path, f"{http_mirror}/{f.path}", f.sha256),)})
    path = fetch(local, cache_dir=tmp_path / "cache")
    assert sha256sum(path) == f.sha256 and path.name == "tomopy_tooth.h5"
    bad = Dataset(**{**tooth.__dict__, "files": (DataFile(f.path, f"{http_mirror}/{f.path}", "0" * 64),)})
    path.unlink()
    with pytest.raises(DataError, match="SHA-256"):
        fetch(bad, cache_dir=tmp_path / "cache")
    assert not path.exists() and _leftovers(tmp_path / "cache") == []


def test_open_dataset_via_download(tmp_path, http_mirror, monkeypatch):
    monkeypatch.delenv("DIPUQ_DATA_MIRROR", raising=False)
    tooth = get("tooth")
    f = tooth.files[0]
    monkeypatch.setitem(DATASETS, "tooth", Dataset(**{**tooth.__dict__, "files": (
        DataFile(f.path, f"{http_mirror}/{f.path}", f.sha256),)}))
    scan = open_dataset("tooth", cache_dir=tmp_path / "cache", row=1)
    assert scan.projections.shape == (181, 640) and scan.meta["dataset"] == "tooth"
    assert scan.meta["row"] == 1


# -- CLI ------------------------------------------------------------------------------------------
def test_cli_data_list(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "KIND", "SIZE", "LICENCE"]
    assert out[1].startswith("tooth ") and "1018.9 KiB" in out[1] and "TomoPy" in out[1]
    assert out[2].startswith("diamond-24737 ") and "3D parallel" in out[2] and "Apache-2.0" in out[2]
    assert [line.split()[0] for line in out[3:]] == ["psi-wood", "liquidet-n6", "diamond-k11"]
    assert "NeXus" in out[5] and "limited angle" in out[4] and "GPL-3.0" in out[3]


def test_cli_data_info(capsys):
    assert main(["data", "info", "diamond-24737"]) == 0
    out = capsys.readouterr().out
    assert "94 file(s)" in out and "angles.txt" in out and "85.8" in out and "Apache-2.0" in out


def test_cli_data_fetch(capsys, shared_data, tmp_path, monkeypatch):
    monkeypatch.delenv("DIPUQ_DATA_MIRROR", raising=False)
    assert main(["data", "fetch", "tooth", "--mirror", str(shared_data)]) == 0
    assert capsys.readouterr().out.strip() == str(shared_data / "tomopy_tooth.h5")
    monkeypatch.setitem(DATASETS, "toy", _toy(tmp_path))
    assert main(["data", "fetch", "toy", "--cache", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == str(tmp_path / "c" / "toy") and out[0].startswith("downloading file://")


@pytest.mark.parametrize("argv", [["data", "info", "nope"], ["data", "fetch", "nope"]])
def test_cli_unknown_name_one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == "dipuq: error: unknown dataset 'nope': available: tooth, diamond-24737, psi-wood, liquidet-n6, diamond-k11\n"


def test_cli_corrupt_download_exit_code(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("DIPUQ_DATA_MIRROR", raising=False)
    monkeypatch.setitem(DATASETS, "toy", _toy(tmp_path, corrupt="toy/a.txt"))
    assert main(["data", "fetch", "toy", "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SHA-256" in err


def test_cli_data_info_new_entries(capsys):
    assert main(["data", "info", "diamond-k11"]) == 0
    out = capsys.readouterr().out
    assert "3 file(s)" in out and "image_key" in out and "3001 projections" in out and "gts_theta" in out
    assert main(["data", "info", "liquidet-n6"]) == 0
    assert "1-4 frames per tilt" in capsys.readouterr().out


def test_nexus_dataset_downloads_with_its_linked_files(tmp_path, http_mirror, monkeypatch):
    """diamond-k11 fetched over (local) HTTP into a cache: the .nxs finds its external files there."""
    monkeypatch.delenv("DIPUQ_DATA_MIRROR", raising=False)
    ds = get("diamond-k11")
    local = Dataset(**{**ds.__dict__, "files": tuple(DataFile(f.path, f"{http_mirror}/{f.path}", f.sha256)
                                                     for f in ds.files)})
    monkeypatch.setitem(DATASETS, "diamond-k11", local)
    scan = open_dataset("diamond-k11", cache_dir=tmp_path / "cache", row=0)
    assert (tmp_path / "cache" / "httomo_k11" / "k11-18014" / "k11-18014-imaging.h5").is_file()
    assert scan.projections.shape == (3001, 26) and scan.meta["dataset"] == "diamond-k11"
