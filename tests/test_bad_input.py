"""Bad and odd input to `segment predict`, `segment evaluate` and `read_scan`, built from a real
hippocampus case.

Unusable files must stop with one sentence and leave nothing behind; odd but usable ones (NaN
voxels, other data types and byte orders, scaled data, tiny volumes, awkward file names) must
be segmented. The fuzz tests mutate the real case at random and check that `read_scan` either
gives a clean 3D float32 volume or refuses the file with a `ScanError`: nothing else, ever.
The CLI runs in-process (typer's CliRunner): a subprocess per case would spend most of this
file's time importing torch.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import resource
import shutil
import signal
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from typer.testing import CliRunner

from segment.cli import app
from segment.io import MAX_VOXELS, ScanError, read_scan

pytestmark = pytest.mark.slow

MODEL = "hippocampus_3d"
TASK = "Task04_Hippocampus"
HEADER_BYTES = 352  # a single-file NIfTI-1 header and its extension flag; the voxels follow

# Even with database=None, hypothesis caches constants found in the source code under its home
# folder, ./.hypothesis by default, while pytest collects: keep that out of the repository.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "segment-hypothesis")


@dataclass(frozen=True)
class RealCase:
    """The first hippocampus training case, as a file, an image, and uncompressed bytes."""

    path: Path
    image: nib.Nifti1Image = field(repr=False)
    nii: bytes = field(repr=False)

    @property
    def data(self) -> np.ndarray:
        return np.asarray(self.image.dataobj)

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(f"RealCase({self.path.name})")  # hypothesis prints it with a failing example

    def like(self, data: np.ndarray) -> bytes:
        """``data`` as a gzipped NIfTI with this case's affine."""
        return gzip.compress(nib.Nifti1Image(data, self.image.affine).to_bytes())


@pytest.fixture(scope="module")
def real(hippocampus_root) -> RealCase:
    path = sorted((hippocampus_root / TASK / "imagesTr").glob("*.nii.gz"))[0]
    return RealCase(path, nib.load(path), gzip.decompress(path.read_bytes()))


def with_header(nii: bytes, **fields) -> bytes:
    """``nii`` with NIfTI-1 header fields overwritten as stored: nibabel checks and fixes nothing."""
    header = nib.Nifti1Header(binaryblock=nii[:348])
    for name, value in fields.items():
        header.structarr[name] = value
    return header.binaryblock + nii[348:]


def enormous_header(nifti: type[nib.Nifti1Image], size: int) -> bytes:
    """A header declaring size^3 float32 voxels, made without allocating them."""
    return nifti(np.broadcast_to(np.float32(0), (size,) * 3), np.eye(4)).header.binaryblock + bytes(4)


@contextlib.contextmanager
def memory_cap(extra: int = 1 << 30):
    """Cap this process's address space at its current size plus ``extra``: reading a header
    that declares a huge volume then fails at once with MemoryError (which read_scan must never
    come to) instead of taking the machine's memory."""
    in_use = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (in_use + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def predict(*args: str):
    return CliRunner().invoke(app, ["predict", "--model", MODEL, *args])


def error_lines(result) -> list[str]:
    """The CLI's own error lines; progress bars may share stderr with them."""
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    return [line for line in result.stderr.splitlines() if line.startswith("Error: ")]


# --- segment predict: unusable input ---------------------------------------------------------

# File name -> (its content, made from the real case, and what the refusal says).
UNUSABLE: dict[str, tuple[Callable[[RealCase], bytes], str]] = {
    "picture.nii.gz": (lambda case: b"\x89PNG\r\n\x1a\n" + bytes(64), "is not a readable NIfTI file"),
    "notes.nii.gz": (lambda case: b"just some text, not a scan", "is not a readable NIfTI file"),
    "notes.nii": (lambda case: b"just some text, not a scan\n" * 20, "is not a readable NIfTI file"),
    "empty.nii.gz": (lambda case: b"", "is empty"),
    "cut.nii.gz": (lambda case: case.path.read_bytes()[:-20_000], "is not a readable NIfTI file"),
    "cut.nii": (lambda case: case.nii[:-20_000], "but the file holds only"),
    "corrupt.nii.gz": (
        lambda case: case.path.read_bytes()[:20_000] + bytes(200) + case.path.read_bytes()[20_200:],
        "is not a readable NIfTI file",
    ),
    "volumes.nii.gz": (lambda case: case.like(np.stack([case.data] * 3, axis=-1)), "has 4 dimensions"),
    "slice.nii.gz": (
        lambda case: case.like(case.data[:, :, case.data.shape[2] // 2].copy()),
        f"is a 2D image but {MODEL} is a 3D model",
    ),
    "bomb.nii": (lambda case: enormous_header(nib.Nifti2Image, 60000), "more than the 536,870,912 allowed"),
    "nan-sform.nii": (
        lambda case: with_header(case.nii, sform_code=1, srow_x=[np.nan, 0, 0, 1]),
        "holds NaN or infinite values",
    ),
    "nan-qform.nii": (
        lambda case: with_header(case.nii, sform_code=0, qform_code=1, pixdim=[1, np.nan, 1, 1, 1, 0, 0, 0]),
        "holds NaN or infinite values",
    ),
    "zero-axis.nii": (
        lambda case: with_header(case.nii, sform_code=1, srow_x=[0, 0, 0, 1]),
        "is singular",
    ),
}


@pytest.mark.parametrize("name", list(UNUSABLE))
def test_predict_refuses_an_unusable_file_in_one_sentence_and_writes_nothing(
    tmp_path, monkeypatch, real, name
):
    make, expected = UNUSABLE[name]
    (tmp_path / name).write_bytes(make(real))
    monkeypatch.chdir(tmp_path)
    result = predict("--input", name, "--output", "masks/mask.nii.gz")
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    [line] = error_lines(result)
    assert name in line and expected in line, line
    assert sorted(path.name for path in tmp_path.iterdir()) == [name], "no mask, sidecar or temporary file"


def test_an_enormous_declared_volume_is_refused_before_anything_is_allocated(tmp_path):
    headers = {
        "nifti1.nii": enormous_header(nib.Nifti1Image, 32767),  # NIfTI-1 sizes are 16-bit
        "nifti2.nii": enormous_header(nib.Nifti2Image, 60000),
        "nifti2.nii.gz": gzip.compress(enormous_header(nib.Nifti2Image, 60000) + bytes(1 << 20)),
    }
    for name, content in headers.items():
        (tmp_path / name).write_bytes(content)
        with memory_cap(), pytest.raises(ScanError, match="more than the 536,870,912 allowed"):
            read_scan(tmp_path / name)


def test_a_header_declaring_more_data_than_the_file_holds_is_refused_before_allocating(tmp_path, real):
    # 512^3 float64 voxels: within MAX_VOXELS, but 1 GB that nibabel would allocate up front.
    header = with_header(real.nii, dim=[3, 512, 512, 512, 1, 1, 1, 1], datatype=64, bitpix=64)
    for name, content in (("short.nii", header), ("short.nii.gz", gzip.compress(header))):
        (tmp_path / name).write_bytes(content)
        with memory_cap(256 << 20), pytest.raises(ScanError, match="but the file holds only 62,827"):
            read_scan(tmp_path / name)


# --- segment predict: odd but usable input ---------------------------------------------------


@pytest.fixture(scope="module")
def reference_mask(real, tmp_path_factory) -> np.ndarray:
    """The bundled model's mask of the unaltered case, through the same CLI."""
    output = tmp_path_factory.mktemp("reference") / "mask.nii.gz"
    result = predict("--input", str(real.path), "--output", str(output))
    assert result.exit_code == 0, result.output
    return np.asarray(nib.load(output).dataobj)


def non_finite(case: RealCase) -> bytes:
    data = case.data.astype(np.float32)
    data[:2, :2, :2] = np.nan  # 8 voxels in a corner, far from the hippocampus
    data[-1, -1, -3:] = np.inf
    data[-1, 0, -1] = -np.inf
    return case.like(data)


def big_endian(case: RealCase) -> bytes:
    header = nib.Nifti1Header(endianness=">")
    image = nib.Nifti1Image(case.data.astype(">i2"), case.image.affine, header)
    content = image.to_bytes()
    assert content[:4] == struct.pack(">i", 348), "stored big-endian"
    return gzip.compress(content)


def scaled(case: RealCase) -> bytes:
    """Stored int16 s with scl_slope 2 and scl_inter -100: intensities 2 s - 100."""
    content = with_header(
        nib.Nifti1Image(case.data.astype(np.int16), case.image.affine).to_bytes(),
        scl_slope=2.0,
        scl_inter=-100.0,
    )
    stored = nib.Nifti1Image.from_bytes(content)
    assert stored.get_data_dtype() == np.int16 and stored.dataobj.slope == 2.0, "stored scaled"
    return gzip.compress(content)


# File name -> (its content, made from the real case, and the warning it must give if any).
USABLE: dict[str, tuple[Callable[[RealCase], bytes], str | None]] = {
    "non-finite.nii.gz": (non_finite, "12 NaN or infinite voxels were set to the lowest finite intensity"),
    "big-endian.nii.gz": (big_endian, None),
    "uint8.nii.gz": (lambda case: case.like(case.data.astype(np.uint8)), None),
    "int16.nii.gz": (lambda case: case.like(case.data.astype(np.int16)), None),
    "float64.nii.gz": (lambda case: case.like(case.data.astype(np.float64)), None),
    "scaled-int16.nii.gz": (scaled, None),
    # nibabel takes a zero voxel size as 1 mm; read_scan passes that repair on as a warning.
    "zero-voxel-size.nii": (
        lambda case: with_header(case.nii, sform_code=0, qform_code=1, pixdim=[1, 0, 1, 1, 1, 0, 0, 0]),
        "nibabel found a problem in its header: pixdim[1,2,3] should be non-zero; setting 0 dims to 1",
    ),
}


@pytest.mark.parametrize("name", list(USABLE))
def test_predict_segments_odd_but_usable_scans_as_it_does_the_original(
    tmp_path, monkeypatch, real, reference_mask, name
):
    make, warning = USABLE[name]
    (tmp_path / name).write_bytes(make(real))
    monkeypatch.chdir(tmp_path)
    result = predict("--input", name, "--output", "mask.nii.gz")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]
    assert warnings == ([f"Warning: {name}: {warning}."] if warning else []), result.stderr
    mask = nib.load(tmp_path / "mask.nii.gz")
    np.testing.assert_allclose(mask.affine, real.image.affine, atol=1e-5)
    assert mask.shape == reference_mask.shape
    agreement = (np.asarray(mask.dataobj) == reference_mask).mean()
    assert agreement > 0.999, f"{name}: {agreement:.4%} of voxels as in the original's mask"


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 2), (7, 7, 7)])
def test_tiny_volumes_get_a_mask_of_their_own_shape(tmp_path, monkeypatch, real, shape):
    # From the middle of the scan, where the intensities vary.
    start = [(full - size) // 2 for full, size in zip(real.data.shape, shape, strict=True)]
    crop = real.data[tuple(slice(s, s + size) for s, size in zip(start, shape, strict=True))]
    (tmp_path / "tiny.nii.gz").write_bytes(real.like(crop.copy()))
    monkeypatch.chdir(tmp_path)
    result = predict("--input", "tiny.nii.gz", "--output", "mask.nii.gz")
    assert result.exit_code == 0, result.output
    mask = nib.load(tmp_path / "mask.nii.gz")
    assert mask.shape == shape
    np.testing.assert_allclose(mask.affine, real.image.affine, atol=1e-5)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}


@pytest.mark.parametrize(
    "name",
    [
        "with space.nii.gz",
        "ünïcødé 海马.nii.gz",
        "semi;colon.nii.gz",
        'quote\'s "double".nii.gz',
        "-leading-dash.nii.gz",
        "$(touch pwned) `id`.nii.gz",
    ],
)
def test_file_names_with_shell_and_path_characters_simply_work(tmp_path, monkeypatch, real, name):
    (tmp_path / name).write_bytes(real.path.read_bytes())
    (tmp_path / "masks").mkdir()
    monkeypatch.chdir(tmp_path)
    result = predict("--input", name, "--output", "masks")
    assert result.exit_code == 0, result.output
    assert f"masks/{name}: Anterior" in result.stdout
    stem = name.removesuffix(".nii.gz")
    assert sorted(path.name for path in (tmp_path / "masks").iterdir()) == sorted(
        [name, f"{stem}.labels.json"]
    )
    assert nib.load(tmp_path / "masks" / name).shape == real.image.shape
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([name, "masks"]), "nothing else"


# --- segment evaluate: a case whose files do not fit -----------------------------------------


def small_task(root: Path, hippocampus_root: Path, cases: int = 2) -> Path:
    """An MSD-layout task folder holding copies of the first ``cases`` real cases."""
    source, task = hippocampus_root / TASK, root / TASK
    dataset = json.loads((source / "dataset.json").read_text())
    dataset["training"] = dataset["training"][:cases]
    for entry in dataset["training"]:
        for key in ("image", "label"):
            target = task / entry[key]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / entry[key], target)
    (task / "dataset.json").write_text(json.dumps(dataset))
    return task


def shifted(image: nib.Nifti1Image) -> nib.Nifti1Image:
    affine = image.affine.copy()
    affine[:3, 3] += 5.0  # the same voxels 5 mm away
    return nib.Nifti1Image(np.asarray(image.dataobj), affine)


def cropped(image: nib.Nifti1Image) -> nib.Nifti1Image:
    return nib.Nifti1Image(np.asarray(image.dataobj)[:, :, :-1].copy(), image.affine)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("affine", "the label's shape or affine differs from the image's"),
        ("shape", "the label's shape or affine differs from the image's"),
        ("cut image", "is not a readable NIfTI file"),
        ("unit", "is in µm but"),
    ],
)
def test_evaluate_refuses_a_case_whose_files_do_not_fit_and_writes_no_json(
    tmp_path, monkeypatch, hippocampus_root, change, expected
):
    task = small_task(tmp_path, hippocampus_root)
    second = json.loads((task / "dataset.json").read_text())["training"][1]
    image_path, label_path = task / second["image"], task / second["label"]
    if change == "cut image":
        image_path.write_bytes(image_path.read_bytes()[:-10_000])
    elif change == "unit":  # a mean of millimetres and micrometres would mean nothing
        for path in (image_path, label_path):
            image = nib.load(path)
            image.header.set_xyzt_units(xyz="micron")
            nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine, image.header), path)
    else:
        nib.save((shifted if change == "affine" else cropped)(nib.load(label_path)), label_path)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        app, ["evaluate", "--model", MODEL, "--data", str(task), "--json", "report.json"]
    )
    assert result.exit_code == 2
    [line] = error_lines(result)
    assert expected in line and Path(second["image"]).name.split(".")[0] in line, line
    assert not (tmp_path / "report.json").exists()


def test_evaluate_scores_the_same_small_task_when_nothing_is_changed(tmp_path, monkeypatch, hippocampus_root):
    task = small_task(tmp_path, hippocampus_root)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        app, ["evaluate", "--model", MODEL, "--data", str(task), "--json", "report.json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "report.json").read_text())["cases"] == 2


def test_evaluate_refuses_the_val_split_of_an_ensemble_whose_members_validated_on_different_cases(
    tmp_path, monkeypatch, hippocampus_root
):
    """Fold models joined into one ensemble: each trained on cases another validates on."""
    from segment.models import load_members, save_ensemble
    from segment.models.sources import resolve_model

    _, second, third = load_members(resolve_model(MODEL))
    other_fold = third[1].model_copy(update={"data": third[1].data.model_copy(update={"folds": 5, "fold": 1})})
    save_ensemble([second, (third[0], other_fold)], tmp_path / "folds")
    task = small_task(tmp_path, hippocampus_root)
    monkeypatch.chdir(tmp_path)
    command = ["evaluate", "--model", str(tmp_path / "folds"), "--data", str(task), "--json", "report.json"]
    refused = CliRunner().invoke(app, [*command, "--split", "val"])
    assert refused.exit_code == 2
    [line] = error_lines(refused)
    assert "were validated on different cases (data.folds differs)" in line, line
    assert not (tmp_path / "report.json").exists()
    scored = CliRunner().invoke(app, [*command, "--split", "all"])
    assert scored.exit_code == 0, scored.output
    assert json.loads((tmp_path / "report.json").read_text())["cases"] == 2


def test_evaluate_refuses_a_task_whose_labels_are_not_the_models(tmp_path, monkeypatch, hippocampus_root):
    task = small_task(tmp_path, hippocampus_root)
    dataset = json.loads((task / "dataset.json").read_text())
    dataset["labels"]["3"] = "Tail"
    (task / "dataset.json").write_text(json.dumps(dataset))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["evaluate", "--model", MODEL, "--data", str(task), "--json", "report.json"])
    assert result.exit_code == 2
    [line] = error_lines(result)
    assert "predicts labels [0, 1, 2] but" in line and "has labels [0, 1, 2, 3]" in line, line
    assert not (tmp_path / "report.json").exists()


def test_evaluate_and_report_refuse_an_output_that_is_a_folder_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    evaluate = CliRunner().invoke(app, ["evaluate", "--model", MODEL, "--data", str(tmp_path), "--json", "out"])
    report = CliRunner().invoke(app, ["report", "--output", "out", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    for result in (evaluate, report):
        assert result.exit_code == 2
        [line] = error_lines(result)
        assert "to out: it is a folder; give a file name." in line, line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"], "no store was created"


def test_predict_never_writes_a_mask_over_its_scan(tmp_path, monkeypatch, real):
    monkeypatch.chdir(tmp_path)
    scans = tmp_path / "scans"
    scans.mkdir()
    nib.save(real.image, scans / "case.nii.gz")
    original = (scans / "case.nii.gz").read_bytes()
    for source, output in (("scans/case.nii.gz", "scans"), ("scans/case.nii.gz", "scans/case.nii.gz"), ("scans", "scans")):
        result = CliRunner().invoke(app, ["predict", "--model", MODEL, "--input", source, "--output", output])
        assert result.exit_code == 2
        [line] = error_lines(result)
        assert "would overwrite the scans" in line, line
    assert (scans / "case.nii.gz").read_bytes() == original
    assert sorted(path.name for path in scans.iterdir()) == ["case.nii.gz"]


# --- read_scan under fuzzing ------------------------------------------------------------------


class Hang(BaseException):
    """Not an Exception, so that read_scan's own error handling cannot swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def stop(*_):
        raise Hang(f"still reading after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def assert_reads_cleanly_or_refuses(path: Path) -> None:
    """read_scan's contract: a finite 3D float32 volume with a finite affine, or a ScanError
    whose one-line message names the file. Never another exception, a hang or a memory blow-up."""
    try:
        with memory_cap(), time_limit(10):
            scan = read_scan(path)
    except ScanError as error:
        message = str(error)
        assert path.name in message and "\n" not in message, message
        assert "MemoryError" not in message, message
        return
    assert scan.array.ndim == 3 and scan.array.dtype == np.float32
    assert 0 < scan.array.size <= MAX_VOXELS
    assert np.isfinite(scan.array).all()
    assert scan.affine.shape == (4, 4) and np.isfinite(scan.affine).all()


FUZZ = settings(
    max_examples=1500,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI stays deterministic
    database=None,  # and no .hypothesis folder in the repository
    suppress_health_check=[HealthCheck.too_slow],
)

# Header fields that steer reading: (byte offset, struct code, how many).
FIELDS = {
    "sizeof_hdr": (0, "i", 1),
    "dim": (40, "h", 8),
    "datatype": (70, "h", 1),
    "bitpix": (72, "h", 1),
    "pixdim": (76, "f", 8),
    "vox_offset": (108, "f", 1),
    "scl_slope": (112, "f", 1),
    "scl_inter": (116, "f", 1),
    "qform_code": (252, "h", 1),
    "sform_code": (254, "h", 1),
    "quatern_and_qoffset": (256, "f", 6),
    "srow": (280, "f", 12),
    "magic": (344, "B", 4),
    "extension": (348, "B", 4),
}
# NIfTI-1 datatype code -> bytes per voxel, every type the standard defines.
DATATYPES = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4}
DATATYPES |= {1024: 8, 1280: 8, 1536: 16, 1792: 16, 2048: 32, 2304: 4}
VALUES = {
    "i": st.one_of(st.sampled_from([348, 540, 0, -1]), st.integers(-(2**31), 2**31 - 1)),
    "h": st.one_of(st.integers(-2, 70), st.sampled_from(sorted(DATATYPES)), st.integers(-(2**15), 2**15 - 1)),
    "f": st.one_of(st.sampled_from([0.0, 1.0, -1.0, 352.0]), st.floats(width=32)),
    "B": st.integers(0, 255),
}


@st.composite
def header_edits(draw) -> tuple[int, bytes]:
    """(offset, bytes) to write over the header: random bytes, or one field set to a value."""
    if draw(st.booleans()):
        start = draw(st.integers(0, HEADER_BYTES - 1))
        return start, draw(st.binary(min_size=1, max_size=min(24, HEADER_BYTES - start)))
    offset, code, count = FIELDS[draw(st.sampled_from(sorted(FIELDS)))]
    index = draw(st.integers(0, count - 1))
    return offset + index * struct.calcsize(code), struct.pack("<" + code, draw(VALUES[code]))


def overwrite(content: bytes, edits: list[tuple[int, bytes]]) -> bytes:
    mutable = bytearray(content)
    for offset, replacement in edits:
        mutable[offset : offset + len(replacement)] = replacement
    return bytes(mutable)


def write_fuzzed(folder: Path, content: bytes, compress: bool) -> Path:
    path = folder / ("fuzzed.nii.gz" if compress else "fuzzed.nii")
    path.write_bytes(gzip.compress(content, compresslevel=1) if compress else content)
    return path


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory) -> Path:
    # One folder for all examples: hypothesis reruns a test body, not its function fixtures.
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(edits=st.lists(header_edits(), min_size=1, max_size=6), compress=st.booleans())
def test_read_scan_survives_fuzzed_headers(real, fuzz_folder, edits, compress):
    assert_reads_cleanly_or_refuses(write_fuzzed(fuzz_folder, overwrite(real.nii, edits), compress))


@FUZZ
@given(choices=st.data())
def test_read_scan_survives_fuzzed_voxel_data(real, fuzz_folder, choices):
    """The header's voxel type and size set to a layout that mostly (nearly) fits the voxel
    bytes there are, so that overwritten bytes are read as floats, NaN and Inf patterns among
    them; then the file cut short or padded, and a compressed one cut short too."""

    def draw(strategy, label):
        return choices.draw(strategy, label=label)

    voxel_bytes = len(real.nii) - HEADER_BYTES
    datatype = draw(st.sampled_from(sorted(DATATYPES)), "datatype")
    itemsize = DATATYPES[datatype]
    x, y = draw(st.integers(1, 40), "x"), draw(st.integers(1, 40), "y")
    z = draw(st.integers(0, voxel_bytes // (x * y * itemsize) + 2), "z")
    header = [
        (40, struct.pack("<8h", draw(st.integers(0, 7), "dim[0]"), x, y, z, 1, 1, 1, 1)),
        (70, struct.pack("<2h", datatype, 8 * itemsize)),
    ]
    flips = draw(
        st.lists(st.tuples(st.integers(HEADER_BYTES, len(real.nii) - 1), st.binary(min_size=1, max_size=16))),
        "flips",
    )
    content = overwrite(real.nii, [*header, *flips])
    length = draw(st.one_of(st.none(), st.integers(0, len(content) + 1000)), "length")
    if length is not None:
        content = content[:length] + bytes(max(0, length - len(content)))
    path = write_fuzzed(fuzz_folder, content, compress=draw(st.booleans(), "compress"))
    if path.suffix == ".gz":
        compressed = path.read_bytes()
        cut = draw(st.one_of(st.none(), st.integers(0, len(compressed) - 1)), "compressed length")
        path.write_bytes(compressed[:cut])
    assert_reads_cleanly_or_refuses(path)
