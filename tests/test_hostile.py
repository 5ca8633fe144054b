"""Hostile input, category by category: every bad experiment file, value, path, name, environment variable,
dataset, results table and bench/spectrum option is refused in one line naming the problem and the fix (exit 2, no
traceback), with nothing written and an existing study byte-for-byte unchanged."""

import hashlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import timm
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from PIL import Image

from continuum import bench, report, results, spectrum, train
from continuum.config import ModelConfig, TrainConfig
from continuum.cost import saved_bytes_per_image
from continuum.data import make_synthetic
from continuum.strategy import TUNER
from continuum.sweep import points
from continuum.sweep.cli import main
from continuum.sweep.record import TRIAL_COLUMNS
from conftest import FAST, load_benchmark


@pytest.fixture(scope="module")
def existing(tmp_path_factory) -> Path:
    """A results root holding a finished one-point study."""
    root = tmp_path_factory.mktemp("existing")
    assert main([*FAST, "--out", str(root), "--segments", "1"]) == 0
    return root


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*"))}


def _refused(run, root: Path, capsys, message: str, code: int = 2) -> None:
    """``run()`` returns ``code`` with one line on stderr holding ``message``, and leaves ``root`` unchanged."""
    before = _digest(root)
    capsys.readouterr()
    assert run() == code
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert _digest(root) == before


@pytest.fixture
def study(existing, tmp_path):
    shutil.copytree(existing, tmp_path, dirs_exist_ok=True)
    return tmp_path


def _sweep(root: Path, *args: str) -> int:
    return main(["--quiet", "--out", str(root), "--dataset", "synthetic", "--epochs", "1", "--batch-size", "64",
                 *args])


EXPERIMENT_FILES = [
    ("[model]\nwidth = 2\n", "[model] is not valid; model is a value, not a table"),
    ("[optimizer]\nlr = 0.1\n", "unknown setting(s) ['optimizer.lr']"),
    ("colour = 'red'\n", "unknown setting(s) ['colour']"),
    ("[train]\nepoch = 3\n", "unknown setting(s) ['train.epoch']"),
    ("epochs = 2.5\n", "epochs=2.5 is not valid; use a whole number"),
    ("epochs = true\n", "epochs=True is not valid; use a whole number"),
    ("seeds = [0.5]\n", "seeds=0.5 is not valid"),
    ("data = 3\n", "data=3 is not valid; [data] is a table of settings"),
    ("train = [1, 2]\n", "train=[1, 2] is not valid; [train] is a table of settings"),
    ("segments = []\n", "segments: give at least one value"),
    ("[segments]\na = 1\n", "[segments] is not valid; segments is a value, not a table"),
    ("[train]\nlr = -1.0\n", "lr=-1.0 is not valid; use learning rates > 0"),
    ("[data]\ntrain_size = -3\n", "train_size=-3 is not valid"),
    ("epochs = \n", "not valid TOML"),
    (b"\xff\xfe\x00 epochs = 1", "x.toml: cannot read it (UnicodeDecodeError"),
]


@pytest.mark.parametrize("content, message", EXPERIMENT_FILES)
def test_bad_experiment_files(study, capsys, content, message):
    config = study / "x.toml"
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    _refused(lambda: main(["--quiet", "--out", str(study), "--config", str(config)]), study, capsys, message)


def test_an_experiment_file_that_is_a_folder_or_missing(study, capsys):
    _refused(lambda: main(["--quiet", "--out", str(study), "--config", str(study)]), study, capsys, "cannot read it")
    _refused(lambda: main(["--quiet", "--out", str(study), "--config", str(study / "none.toml")]), study, capsys,
             "none.toml: no such file")


VALUES = [
    (["--seeds", "0,4294967296"], "seeds='4294967296' is not valid; use whole numbers in 0..4294967295"),
    (["--seeds", "-1"], "seeds='-1' is not valid"),
    (["--seeds", "0,0"], "seeds: 0 is listed twice"),
    (["--seeds", ","], "seeds: give at least one value"),
    (["--width", "inf"], "width=inf is not valid; use a finite number"),
    (["--width", "nan"], "width=nan is not valid"),
    (["--width", "0"], "width=0.0 is not valid; use 0 < value"),
    (["--train-size", "-5"], "train_size=-5 is not valid"),
    (["--val-size", "-1"], "val_size=-1 is not valid"),
    (["--lr", "nan"], "lr=nan is not valid"),
    (["--lr", "-0.1"], "lr=-0.1 is not valid"),
    (["--weight-decay", "-1"], "weight_decay=-1.0 is not valid"),
    (["--label-smoothing", "1.5"], "label_smoothing=1.5 is not valid"),
    (["--batch-size", "0"], "batch_size=0 is not valid"),
    (["--epochs", "2.5"], "epochs='2.5' is not valid"),
    (["--workers", "0"], "workers=0 is not valid"),
    (["--workers", "10000"], "workers=10000 is more than the "),  # not 10,000 processes until memory runs out
    (["--width", "1e9"], "continuum_small at width 1e+09 is too large to build"),
    (["--width", "1000"], "parameters: "),  # TiBs of weights, gradients, momentum: refused unbuilt
    (["--heartbeat", "0"], "heartbeat=0 is not valid"),
    (["--match-params", "-5"], "match_params=-5 is not valid"),
    (["--objectives", "val_acc,val_acc", "--search", "tpe"], "objectives: val_acc is listed twice"),
    (["--population", "8", "--search", "tpe"], "population=8 sizes NSGA-II's generations; give it with --search nsga2"),
    (["--population", "20", "--search", "nsga2"], "population=20 with n_trials=20: NSGA-II would never get past its "
                                                  "first, random generation; give a population below n_trials"),
    (["--population", "1", "--search", "nsga2"], "population=1 is not valid"),
    (["--device", "mps"], "device 'mps' is not supported; use auto, cpu, cuda or cuda:N"),
    (["--device", "meta"], "device 'meta' is not supported"),
    (["--device", "gpu"], "device 'gpu' is not valid"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "device 'cuda:"),
]


@pytest.mark.parametrize("args, message", VALUES)
def test_bad_values(study, capsys, args, message):
    _refused(lambda: _sweep(study, *args), study, capsys, message)


def test_a_batch_whose_activations_do_not_fit_or_that_batch_norm_cannot_take_is_refused(study, capsys, monkeypatch):
    data = make_synthetic(train_size=1000, val_size=10)
    per_image = saved_bytes_per_image(timm.create_model("continuum_small", num_classes=10, in_chans=1), (1, 28, 28))
    monkeypatch.setattr(points, "free_memory", lambda device: 100 * per_image)  # weights: a few MiB of it
    cpu, fp32 = torch.device("cpu"), {"precision": "fp32"}
    points.check_fits_memory(ModelConfig(), data, cpu, TrainConfig(batch_size=64, **fp32))
    with pytest.raises(ValueError, match=r"continuum_small at width 1 with batches of 1,000 images needs at least "
                                         r"[\d.]+ GiB to train \(\d[\d,]+ parameters: [\d.]+ MiB; activations: "
                                         r"[\d.]+ GiB\), and this machine has [\d.]+ MiB free; use a smaller "
                                         r"--batch-size"):
        points.check_fits_memory(ModelConfig(), data, cpu, TrainConfig(batch_size=5000, **fp32))  # the 1,000 images
    with pytest.raises(ValueError, match="for each of 2 workers"):
        points.check_fits_memory(ModelConfig(), data, cpu, TrainConfig(batch_size=64, **fp32), sharing=2)
    points.check_fits_memory(ModelConfig(), data, cpu, TrainConfig(batch_size=180, precision="bf16"))  # half-size
    monkeypatch.setattr(train, "cpu_flags", lambda: {"avx2"})  # "auto" without bf16: float32 activations
    with pytest.raises(ValueError, match="with batches of 180 images needs at least"):
        points.check_fits_memory(ModelConfig(), data, cpu, TrainConfig(batch_size=180, precision="auto"))
    monkeypatch.setattr(train, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    points.check_fits_memory(ModelConfig(), data, cpu, TrainConfig(batch_size=180, precision="auto"))
    tiny = make_synthetic(train_size=4, val_size=2, input_size=(1, 1, 1))  # batch norm of 1 x 1 maps
    with pytest.raises(ValueError, match=r"continuum_small cannot train on batches of one image \(Expected more than 1 "
                                         r"value per channel when training, .*\); use --batch-size 2 or more"):
        points.check_fits_memory(ModelConfig(), tiny, cpu, TrainConfig(batch_size=1))
    points.check_fits_memory(ModelConfig(), tiny, cpu, TrainConfig(batch_size=2))
    _refused(lambda: _sweep(study, "--batch-size", "4096", "--precision", "fp32"), study, capsys,
             "with batches of 512 images needs at least")


def test_bad_paths_and_names(study, capsys):
    (study / "afile").write_text("x")
    _refused(lambda: _sweep(study / "afile", "--segments", "1"), study, capsys, "is a file, not a folder")
    _refused(lambda: _sweep(study / "afile" / "below", "--segments", "1"), study, capsys, "is a file, not a folder")
    for name in ("a?b", "a/b", "..", ".hidden", "a#b", "a b"):
        _refused(lambda: _sweep(study, "--study", name), study, capsys, "is not valid; use a plain name")
    _refused(lambda: _sweep(study, "--storage", f"journal:{study}"), study, capsys, "is a folder; name a file in it")
    _refused(lambda: _sweep(study, "--storage", f"sqlite:///{study}"), study, capsys, "is a folder; name a file")
    _refused(lambda: _sweep(study, "--storage", f"sqlite:///{study}/none/x.db", "--study", "other"), study, capsys,
             "folder " + str(study / "none") + " does not exist; make it")
    assert not (study / "other").exists()  # the results folder made for it went again
    _refused(lambda: _sweep(study, "--storage", f"journal:{study}/none/x.log", "--study", "other"), study, capsys,
             "folder " + str(study / "none") + " does not exist")
    _refused(lambda: _sweep(study, "--storage", "mongodb://x"), study, capsys, "--storage 'mongodb://x' is not valid")
    _refused(lambda: _sweep(study, "--storage", "journal:{outt}/x.log"), study, capsys,
             "storage='journal:{outt}/x.log' is not valid; {outt} names no setting: use {out} or {study}")
    if importlib.util.find_spec("MySQLdb") is None:  # the default MySQL driver, not installed
        _refused(lambda: _sweep(study, "--storage", "mysql://u@localhost/db"), study, capsys,
                 "cannot open storage mysql://u@localhost/db: the database driver MySQLdb is not installed; install "
                 "it (pip) or name a driver you have in the URL, such as mysql+pymysql://")
    _refused(lambda: _sweep(study, "--storage", "journal:/proc/x.log", "--study", "other"), study, capsys,
             "cannot open /proc/x.log (")


@pytest.mark.parametrize("variable, value, message", [
    ("CONTINUUM_TUNE_MS", "abc", "CONTINUUM_TUNE_MS='abc' is not valid"),
    ("CONTINUUM_TUNE_MS", "-5", "CONTINUUM_TUNE_MS='-5' is not valid"),
    ("CONTINUUM_TUNE_MS", "nan", "CONTINUUM_TUNE_MS='nan' is not valid"),
    ("CONTINUUM_CONV_STRATEGY", "fastest", "conv strategy mode 'fastest' is not valid"),
    ("CONTINUUM_CACHE", "/etc/hostname", "CONTINUUM_CACHE=/etc/hostname is not a folder"),
    ("CONTINUUM_BUILD_KERNELS", "maybe", "CONTINUUM_BUILD_KERNELS='maybe' is not valid; use 1 or 0 (on, off)"),
    ("CONTINUUM_KEEP_FREED_MEMORY", "2", "CONTINUUM_KEEP_FREED_MEMORY='2' is not valid; use 1 or 0"),
])
def test_bad_environment(study, capsys, monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    TUNER.forget()
    try:
        _refused(lambda: _sweep(study, "--segments", "1"), study, capsys, message)
    finally:
        monkeypatch.undo()
        TUNER.forget()


def _images(folder: Path, classes: dict[str, int], size: int = 12) -> None:
    for name, count in classes.items():
        (folder / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (size, size), (40 * i % 255, 90, 30)).save(folder / name / f"{i}.png")


def test_bad_datasets(study, tmp_path, capsys):
    one = tmp_path / "one_class"
    _images(one, {"cat": 4})
    _refused(lambda: _sweep(study, "--dataset", f"imagefolder:{one}"), study, capsys,
             "1 class folder (cat); a classifier needs at least 2")
    corrupt = tmp_path / "corrupt"
    _images(corrupt, {"cat": 3, "dog": 3})
    (corrupt / "dog" / "bad.png").write_bytes(b"not a png at all")
    _refused(lambda: _sweep(study, "--dataset", f"imagefolder:{corrupt}"), study, capsys,
             f"cannot read image {corrupt / 'dog' / 'bad.png'}")
    split = tmp_path / "split"
    _images(split / "train", {"cat": 2, "dog": 2})
    _images(split / "val", {"cat": 2, "emu": 2})
    _refused(lambda: _sweep(study, "--dataset", f"imagefolder:{split}"), study, capsys,
             "train/ has classes ['cat', 'dog'] but val/ has ['cat', 'emu']")
    _refused(lambda: _sweep(study, "--dataset", f"imagefolder:{tmp_path / 'none'}"), study, capsys, "imagefolder:")
    _refused(lambda: _sweep(study, "--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere" / "cifar")),
             study, capsys, "cifar10 not found")
    assert not (tmp_path / "nowhere").exists()  # the failed download left no folder
    a_file = tmp_path / "data.txt"
    a_file.write_text("not a folder")
    for dataset in ("fashion-mnist", "cifar10"):
        _refused(lambda: _sweep(study, "--dataset", dataset, "--data-dir", str(a_file)), study, capsys,
                 f"--data-dir {a_file} is a file, not a folder")


TABLES = [
    (b"", "is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\xff\xfe\n", "is not a CSV table"),
    (b"trial,state,model\n0,COMPLETE,continuum_small\n", "lacks the columns"),
    (b"name,score\nx,1\n", "lacks the columns"),
    (None, "is cut off mid-row (truncated)"),
    ("state", "column state holds ['DONE'], not trial states"),
    ("val_acc", "column val_acc holds values that are not numbers"),
    ("trial", "column trial must hold a trial number in every row"),
]


@pytest.mark.parametrize("content, message", TABLES)
def test_bad_results_tables(study, capsys, content, message):
    folder = study / "default"
    table = folder / "trials.csv"
    if content is None:
        table.write_bytes(table.read_bytes()[:-9])
    elif isinstance(content, str):  # one cell of a real table made wrong
        frame = results.load(folder)
        frame[content] = frame[content].astype(object)
        frame.loc[0, content] = {"state": "DONE", "val_acc": "high", "trial": None}[content]
        frame.to_csv(table, index=False)
    else:
        table.write_bytes(content)
    _refused(lambda: report.main([str(folder)]), study, capsys, message)
    with pytest.raises(results.TableError, match="trials.csv"):
        results.load(folder)


def test_reading_a_storage_url_creates_nothing_and_names_what_is_missing(tmp_path):
    for url in (f"sqlite:///{tmp_path / 'none.db'}", f"journal:{tmp_path / 'none.journal'}"):
        with pytest.raises(FileNotFoundError, match="no study storage at .*none"):
            results.load(url, study_name="default")
    assert list(tmp_path.iterdir()) == []  # reading made no empty database or journal
    url = f"journal:{tmp_path / 'study.journal'}"
    optuna.create_study(study_name="spectrum", storage=JournalStorage(JournalFileBackend(url[8:])))
    with pytest.raises(ValueError, match="no study 'default' in journal:.*; it holds 'spectrum'"):
        results.load(url, study_name="default")
    with pytest.raises(ValueError, match="needs study_name="):
        results.load(url)
    assert list(results.load(url, study_name="spectrum").columns) == TRIAL_COLUMNS  # a journal URL, as the sweep prints
    with pytest.raises(TypeError, match="source=3 is not a results folder"):
        results.load(3)


def test_report_on_a_missing_folder_or_a_file(study, capsys):
    _refused(lambda: report.main([str(study / "none")]), study, capsys, "no results table at")
    _refused(lambda: report.main([str(study / "default" / "summary.md")]), study, capsys, "is not a CSV table")


@pytest.mark.parametrize("args, message", [
    (["--segments", "5x"], "segments='5x' is not valid; use an int >= 1 or 'all'"),
    (["--segments", "0"], "segments=0 is not valid; use an int >= 1 or 'all'"),
    (["--segments", "3,5", "--shapes", "small_64"], "--segments 3,5: none divides the 64 channels of shape small_64"),
    (["--segments", ","], "--segments: give at least one value"),
    (["--train", "--no-conv", "--train-images", "0"], "--train-images=0 is not valid"),
    (["--repeats", "0"], "--repeats=0 is not valid"),
    (["--min-ms", "-1"], "--min-ms=-1.0 is not valid"),
    (["--dtypes", "fp64"], "--dtypes='fp64' is not valid; choose one of fp32, bf16"),
    (["--dtypes", "fp32,,bf16"], "--dtypes 'fp32,,bf16' has an empty item; separate the values with single commas, "
                                 "such as fp32,bf16"),
    (["--segments", "1,4,"], "--segments '1,4,' has an empty item"),
    (["--shapes", "small_64,,96x28x64"], "--shapes 'small_64,,96x28x64' has an empty item"),
    (["--shapes", "huge"], "--shapes: 'huge' is neither a known shape"),
    (["--shapes", "96x28"], "--shapes: '96x28' is neither a known shape"),
    (["--shapes", "96x0x64"], "CxHxB with positive integers, such as 96x28x64"),
    (["--shapes", "8x-4x2"], "CxHxB with positive integers"),
    (["--shapes", " , "], "--shapes: give at least one shape"),
    (["--train-segments", "3x"], "segments='3x' is not valid"),
    (["--train-segments", ","], "--train-segments: give at least one value"),
    (["--train", "--no-conv", "--train-segments", "4,3"], "--train-segments 3: stages.stage1.0.rep.0.spatial: "
                                                          "segments=3 does not fit in_channels=32"),
    (["--tuning", "warm"], "--tuning='warm' is not valid; choose one of cold, loaded, cached"),
    (["--device", "meta"], "device 'meta' is not supported"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "device 'cuda:"),
])
def test_bad_bench_options_keep_its_tables(tmp_path, capsys, args, message):
    (tmp_path / "conv_cpu.csv").write_text("an earlier table\n")
    _refused(lambda: bench.main(["--out", str(tmp_path), *args]), tmp_path, capsys, message)


@pytest.mark.parametrize("script, args, message", [
    ("precision_step", ["--segments", "4,x"], "segments='x' is not valid; use an int >= 1 or 'all'"),
    ("precision_step", ["--segments", " , "], "--segments: give at least one value, such as 4,all"),
    ("precision_step", ["--rounds", "0"], "argument --rounds: 0 is not valid; use a whole number >= 1"),
    ("precision_step", ["--batch", "1.5"], "argument --batch: '1.5' is not valid; use a whole number"),
    ("precision_step", ["--device", "tpu"], "argument --device: device 'tpu' is not valid"),
    ("precision_step", ["--out", "{tmp}/table.csv"], "table.csv is a file, not a folder"),
    ("train_loop", ["--images", "60001"], "argument --images: 60001 is not valid; use a whole number in 1..60000"),
    ("train_loop", ["--workers", "0,-1"], "--workers=-1 is not valid; use a whole number >= 0"),
    ("train_loop", ["--segments", "all,0"], "segments=0 is not valid"),
    ("table_bookkeeping", ["--every", "0"], "argument --every: 0 is not valid; use a whole number >= 1"),
    ("precision_accuracy", ["--root", "{tmp}/none"], "no results table at"),
    ("batch_norm", ["--shapes", "64x28"], "--shapes: '64x28' is neither a known shape"),
    ("batch_norm", ["--segments", "0"], "segments=0 is not valid"),
    ("batch_norm", ["--dtypes", "fp32,fp16"], "--dtypes='fp16' is not valid; choose one of fp32, bf16"),
    ("batch_norm", ["--batch", "1"], "argument --batch: 1 is not valid; use a whole number >= 2"),
    ("batch_norm", ["--out", "{tmp}/table.csv"], "table.csv is a file, not a folder"),
])
def test_bad_benchmark_options_end_in_one_error_line(tmp_path, capsys, monkeypatch, script, args, message):
    (tmp_path / "table.csv").write_text("an earlier table\n")
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *(arg.format(tmp=tmp_path) for arg in args)])
    before = _digest(tmp_path)
    with pytest.raises(SystemExit) as stop:
        load_benchmark(script).main()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"{script}.py: error: ") and message in err.splitlines()[-1], err
    assert "Traceback" not in err and _digest(tmp_path) == before


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size=0 is not valid"),
    (["--segments", "0"], "segments=0 is not valid"),
    (["--input-size", "1,x,3"], "--input-size='x' is not valid"),
    (["--input-size", "1,28"], "--input-size '1,28' is not valid; give C,H,W"),
    (["--input-size", "1,,28,28"], "--input-size '1,,28,28' has an empty item"),
    (["--compare", "continuum_small,"], "--compare 'continuum_small,' has an empty item"),
    (["--num-classes", "-1"], "--num-classes=-1 is not valid"),
    (["--repeats", "0"], "--repeats=0 is not valid"),
    (["--warmup", "-1"], "--warmup=-1 is not valid"),
    (["--device", "meta"], "device 'meta' is not supported"),
    (["--model", "nonet"], "'nonet' is not a registered model"),
    (["--segments", "3,5"], "--segments 3,5: no count fits continuum_small (stages.stage1.0.rep.0.spatial: "
                            "segments=3 does not fit"),
])
def test_bad_spectrum_options_write_nothing(tmp_path, capsys, args, message):
    _refused(lambda: spectrum.main(["--quiet", "--out", str(tmp_path / "out"), *args]), tmp_path, capsys, message)


def test_bench_and_spectrum_refuse_an_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    _refused(lambda: bench.main(["--out", str(tmp_path / "afile")]), tmp_path, capsys, "is a file, not a folder")
    _refused(lambda: spectrum.main(["--out", str(tmp_path / "afile")]), tmp_path, capsys, "is a file, not a folder")


def test_an_out_in_a_place_nothing_can_be_written_is_refused(study, capsys):
    """/proc passes a permission check as root, yet takes no files."""
    for run in (lambda: _sweep(Path("/proc/continuum"), "--segments", "1"),
                lambda: bench.main(["--out", "/proc/continuum"]), lambda: spectrum.main(["--out", "/proc/continuum"])):
        _refused(run, study, capsys, ": cannot write in /proc (")


def test_from_the_shell_bad_input_is_one_line_without_traceback(tmp_path):
    commands = {module: subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, cwd=tmp_path)  # started together:
                for module, args in [("continuum.sweep", ["--seeds", "0,4294967296"]),  # their imports overlap
                                     ("continuum.report", [str(tmp_path)]), ("continuum.bench", ["--segments", "0"]),
                                     ("continuum.spectrum", ["--batch-size", "0"])]}
    for module, process in commands.items():
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 2, (module, stderr)
        assert stderr.startswith("error: ") and stderr.count("\n") == 1, (module, stderr)
    assert list(tmp_path.iterdir()) == []
