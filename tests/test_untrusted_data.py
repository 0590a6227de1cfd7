"""Data files and names from elsewhere, read as untrusted: a CIFAR-10 pickle that would run code, a .h5.gz that
inflates past any PCam file, a Kaggle TIF that declares a huge image, a --name that a storage URI would decode into
a path, credentials inside a storage URI. Each is refused in one line naming the file or flag, with exit status 2
and no traceback where a CLI reads it; the real formats still read. Harmless payloads only: the code a hostile
pickle would run creates a marker file, and the tests check that it does not exist."""

import codecs
import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from analysis import report
from study import __main__ as study_main
from study.mnist import command as mnist_cli
from study.data import cifar
from study.pcam import data as pcam_data, writer as pcam_writer
from study.errors import StudyError
from tests.test_kaggle import make_folder


# ---------------------------------------------------------------------------------------------- CIFAR-10 pickles


class Py2Pickler(pickle._Pickler):
    """Writes a batch as the released files were written, by Python 2's cPickle (protocol 2): str and bytes as
    Python 2 strings, numpy's functions under numpy.core (see the replace in released_format)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _py2_string(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        head = (pickle.SHORT_BINSTRING + bytes([len(raw)]) if len(raw) < 256
                else pickle.BINSTRING + struct.pack("<i", len(raw)))
        self.write(head + raw)
        self.memoize(obj)

    dispatch[bytes] = _py2_string
    dispatch[str] = _py2_string


def a_batch(n: int = 4) -> tuple[dict, np.ndarray, list]:
    images = np.random.default_rng(0).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = [i % 10 for i in range(n)]
    return ({b"batch_label": b"training batch 1 of 5", b"labels": labels, b"data": images.reshape(n, -1),
             b"filenames": [b"img_%d.png" % i for i in range(n)]}, images, labels)


def released_format(batch: dict) -> bytes:
    out = io.BytesIO()
    Py2Pickler(out, protocol=2).dump(batch)
    return out.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


class Payload:
    """Unpickling this calls os.system, as a hostile batch file would; the command only creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("write", ["released", "protocol 2", "protocol 4", "protocol 5", "write_batch"])
def test_cifar_batches_in_every_real_format_still_read(tmp_path, write):
    batch, images, labels = a_batch()
    path = tmp_path / "data_batch_1"
    if write == "released":
        path.write_bytes(released_format(batch))
        assert b"cnumpy.core.multiarray\n_reconstruct" in path.read_bytes()  # as in the files torchvision fetches
    elif write == "write_batch":
        cifar.write_batch(path, images, labels)
    else:
        path.write_bytes(pickle.dumps(batch, protocol=int(write.split()[1])))
    x, y = cifar.read_batch(path)
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)


@pytest.mark.parametrize("where", ["the file itself", "inside the dict"])
def test_a_cifar_pickle_that_would_run_code_is_refused_unrun(tmp_path, where):
    marker = tmp_path / "payload-ran"
    batch, _, _ = a_batch()
    payload = Payload(marker) if where == "the file itself" else {**batch, b"extra": Payload(marker)}
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(payload, protocol=2))
    pickle.loads(path.read_bytes())  # the plain unpickler would run it: the payload is real
    assert marker.exists()
    marker.unlink()
    with pytest.raises(StudyError, match=r"data_batch_1 is not a CIFAR-10 batch \(it names (posix|os|nt)\.system"):
        cifar.read_batch(path)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["builtins.eval", "numpy.load", "numpy.core.multiarray.scalar",
                                  "numpy.lib.format.read_array", "_codecs.decode"])
def test_only_the_globals_a_batch_needs_are_admitted(tmp_path, name):
    module, attr = name.rsplit(".", 1)
    path = tmp_path / "test_batch"
    path.write_bytes(b"\x80\x02c" + f"{module}\n{attr}\n".encode() + b"q\x00.")  # a pickle of just that global
    with pytest.raises(StudyError, match=f"it names {name},"):
        cifar.read_batch(path)


class OtherCodec:
    """Pickles as _codecs.encode("x", "rot13"): the global protocol 2 writes bytes with, put to another use."""

    def __reduce__(self):
        return codecs.encode, ("x", "rot13")


def test_bytes_as_protocol_2_writes_them_but_no_other_codec(tmp_path):
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(OtherCodec(), protocol=2))
    assert b"c_codecs\nencode" in path.read_bytes()
    with pytest.raises(StudyError, match="_codecs.encode with 'rot13'"):
        cifar.read_batch(path)


# ---------------------------------------------------------------------------------------------- PCam .h5.gz


def gzipped_pcam(root: Path) -> Path:
    out = pcam_writer.make_synthetic(root, 4, 2, 2)
    for h5 in out.glob("*.h5"):
        h5.with_name(h5.name + ".gz").write_bytes(gzip.compress(h5.read_bytes(), compresslevel=1))
        h5.unlink()
    return out


def test_a_gz_that_inflates_past_the_cap_is_refused_and_leaves_nothing(monkeypatch, tmp_path):
    data = gzipped_pcam(tmp_path / "pcam")
    x_size = len(gzip.decompress((data / (pcam_data.file_name("train", "x") + ".gz")).read_bytes()))
    monkeypatch.setattr(pcam_data, "MAX_DECOMPRESSED", {"x": x_size - 1, "y": 64 << 20})
    cache = tmp_path / "cache"
    with pytest.raises(StudyError, match=r"train_x\.h5\.gz decompresses to more than .* MiB, more than any file of "
                                         r"the PCam release"):
        pcam_data.locate(data, cache)
    assert not [p.name for p in cache.rglob("*") if "train_x" in p.name]  # no partial copy, no lock
    monkeypatch.setattr(pcam_data, "MAX_DECOMPRESSED", {"x": x_size, "y": 64 << 20})
    files = pcam_data.locate(data, cache)
    assert pcam_data.verify(files) == {"train": 4, "valid": 2, "test": 2}


def test_the_cap_is_per_kind_and_fits_the_release():
    # train x of the release: 262,144 patches of 96x96x3 bytes, plus HDF5's own few KiB
    assert 262_144 * 96 * 96 * 3 < pcam_data.MAX_DECOMPRESSED["x"] < 16 << 30
    assert 262_144 < pcam_data.MAX_DECOMPRESSED["y"] <= 64 << 20


def test_a_gzip_bomb_of_labels_is_stopped_at_the_cap(monkeypatch, tmp_path):
    data = gzipped_pcam(tmp_path / "pcam")
    bomb = data / (pcam_data.file_name("valid", "y") + ".gz")
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        for _ in range(80):  # 80 MiB of zeros in a file of about 80 KiB
            f.write(bytes(1 << 20))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(StudyError, match=r"valid_y\.h5\.gz decompresses to more than 64 MiB"):
        pcam_data.locate(data, tmp_path / "cache")
    assert sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*") if p.is_file()) < 1 << 20


# ---------------------------------------------------------------------------------------------- Kaggle TIFs


def tif_declaring(path: Path, width: int, height: int) -> None:
    """An uncompressed RGB TIFF whose header declares width x height but which holds 8 bytes of pixels."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, 8 + 2 + 12 * 9 + 4), (277, 3, 1, 3), (278, 4, 1, height), (279, 4, 1, 8)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + bytes(4)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + bytes(8))


def run_pcam_on(capsys, tmp_path, data: Path) -> str:
    code = study_main.main(["run", "pcam", "--data-dir", str(data), "--storage-path", str(tmp_path / "store"),
                            "--name", "k"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "store").exists()
    return err


def test_a_tif_decompression_bomb_ends_in_one_line(capsys, tmp_path):
    src = make_folder(tmp_path / "kaggle")
    tif_declaring(src / "train" / "train002.tif", 100_000, 100_000)  # 10^10 pixels: PIL's bomb check
    err = run_pcam_on(capsys, tmp_path, src)
    assert "train002.tif" in err and "decompression bomb" in err


def test_a_big_tif_is_refused_from_its_header_before_decoding(capsys, tmp_path, recwarn):
    src = make_folder(tmp_path / "kaggle")
    # 1.4e8 pixels: under PIL's error limit, over its warning one. The 8 bytes of pixels would fail to decode
    # ("truncated"), so the size message shows the header was read and nothing decoded.
    tif_declaring(src / "test" / "test001.tif", 12_000, 12_000)
    err = run_pcam_on(capsys, tmp_path, src)
    assert "test001.tif is (12000, 12000, 3) RGB; PCam patches are 96x96x3" in err
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]


# ---------------------------------------------------------------------------------------------- names and URIs


def refused_cli(capsys, argv) -> str:
    code = mnist_cli.main(["--smoke", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("name", ["a%2e%2e", "%2e%2e", "a%2fb", "a?b", "a#b"])
def test_a_name_a_storage_uri_would_decode_is_refused(capsys, tmp_path, name):
    store = tmp_path / "store"
    err = refused_cli(capsys, ["--storage-path", str(store), "--name", name])
    assert f"--name {name!r} contains % ? or #" in err and not store.exists()
    code = study_main.main(["run", "mnist-cnn", "--smoke", "--storage-path", str(store), "--name", name])
    assert code == 2 and "contains % ? or #" in capsys.readouterr().err and not store.exists()


SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCY"


@pytest.mark.parametrize("uri", [
    f"s3://AKIDEXAMPLE:{SECRET}@bucket/prefix",
    f"s3://AKIDEXAMPLE:{SECRET}/x@bucket/prefix",  # a secret with an unescaped /
    f"s3://bucket/prefix?endpoint_override=http://minio:{SECRET}@127.0.0.1:9000",
    f"s3://bucket/prefix?secret_key={SECRET}",
    f"gs://user:{SECRET}@bucket/prefix",
])
def test_credentials_in_a_storage_uri_are_refused_and_not_repeated(capsys, tmp_path, uri):
    err = refused_cli(capsys, ["--storage-path", uri, "--name", "s"])
    assert "must not carry credentials" in err and SECRET not in err
    code = study_main.main(["run", "mnist-cnn", "--smoke", "--storage-path", uri, "--name", "s"])
    err = capsys.readouterr().err
    assert code == 2 and "must not carry credentials" in err and SECRET not in err
    code = report.main([uri + "/s", "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert code == 2 and "EXPERIMENT_DIR must not carry credentials" in err and SECRET not in err
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("uri", ["s3://bucket/prefix", "s3://bucket/prefix?endpoint_override=http://127.0.0.1:9000",
                                 "hdfs://namenode:8020/studies", "file:///tmp/studies"])
def test_uris_without_credentials_pass(uri):
    from study.commands.cli_checks import check_uri

    check_uri(uri, "--storage-path")
