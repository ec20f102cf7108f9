"""gessl-train / gessl-compare end to end on a small slice of the real Fashion-MNIST, and every bad input."""
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from gessl_ext.train.cli import compare_main, train_main, train_parser
from gessl_ext.train.data import DEBIAN_FASHION_MNIST, read_idx
from idx_files import write_idx

pytestmark = pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                                reason="apt-get install dataset-fashion-mnist")

# 12x12 images, 128 pre-training images of classes 0-4, 2 tasks of 8 per step, 2 steps per epoch
TINY = ["--image-size", "12", "--train-classes", "0-4", "--train-subset", "128", "--tasks", "2", "--task-size", "8",
        "--steps-per-epoch", "2", "--eval-train-size", "300", "--eval-test-size", "150", "--fewshot-episodes", "20",
        "--fewshot-queries", "5", "--eval-tasks", "2", "--target-steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    """TINY on a slice of the real Fashion-MNIST, its first 2000 training and 1000 test images as plain IDX
    files: each run (and each torchrun rank) then reads 2 MB instead of decompressing 30 MB and resizing
    70 000 images it never uses."""
    folder = tmp_path_factory.mktemp("fashion-slice")
    for stem, count in (("train-images-idx3-ubyte", 2000), ("train-labels-idx1-ubyte", 2000),
                        ("t10k-images-idx3-ubyte", 1000), ("t10k-labels-idx1-ubyte", 1000)):
        write_idx(folder / stem, read_idx(DEBIAN_FASHION_MNIST / f"{stem}.gz")[:count].numpy(), 0x08, False)
    return TINY + ["--data-dir", str(folder)]


def snapshot(folder: Path) -> dict:
    """Every file's content hash and modification time."""
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.iterdir())}


def run_ok(capsys, args) -> dict:
    assert train_main(args) == 0, capsys.readouterr().err
    out_dir = Path(args[args.index("--out") + 1])
    return json.loads((out_dir / "metrics.json").read_text())


def fail_line(capsys, args, code=2, main=train_main) -> str:
    assert main(args) == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(("gessl-train: error: ", "gessl-compare: error: "))
    return err


@pytest.fixture(scope="module")
def gessl_run(tiny, tmp_path_factory):
    """A two-epoch GeSSL run (shared by the checks below)."""
    out = tmp_path_factory.mktemp("runs") / "gessl"
    assert train_main(tiny + ["--epochs", "2", "--out", str(out)]) == 0
    return out


def check_entry(entry):
    for key in ("knn_accuracy", "linear_accuracy", "fewshot_5way_1shot", "fewshot_5way_5shot",
                "pair_accuracy_unseen", "one_step_accuracy_unseen", "one_step_accuracy_train"):
        assert 0 <= entry[key] <= 100, key
    # real accuracies: well above chance (10% for 10 classes, 20% for 5-way) even for a barely trained net
    assert entry["knn_accuracy"] > 30 and entry["linear_accuracy"] > 30
    assert entry["fewshot_5way_1shot"] > 25 and entry["fewshot_5way_5shot"] > 30
    assert 0 < entry["fewshot_5way_1shot_ci95"] < 20
    assert math.isfinite(entry["sigma_unseen"]) and entry["sigma_unseen"] > 0


def test_metrics_file_of_a_gessl_run(gessl_run):
    metrics = json.loads((gessl_run / "metrics.json").read_text())
    assert metrics["finished"] is True
    assert [h["epoch"] for h in metrics["history"]] == [0, 1, 2] and metrics["final"] == metrics["history"][-1]
    for entry in metrics["history"]:
        check_entry(entry)
    assert metrics["steps"] == 4 and metrics["epochs_completed"] == 2 and metrics["steps_per_epoch"] == 2
    assert metrics["steps_per_second"] > 0 and 0 < metrics["augmentation_share"] < 1
    assert metrics["train_seconds"] > 0 and metrics["wall_clock_seconds"] > metrics["train_seconds"]
    assert 0 < metrics["train_cpu_seconds"] < metrics["cpu_seconds"]
    assert metrics["versions"]["torch"] == torch.__version__ and metrics["device"]["type"] == "cpu"
    assert metrics["config"]["gessl"] is True and metrics["config"]["task_size"] == 8
    assert metrics["data"]["pretrain_classes"] == [0, 1, 2, 3, 4] and metrics["data"]["fewshot_classes"] == [5, 6, 7, 8, 9]
    assert metrics["data"]["pretrain_images"] == 128
    assert (metrics["data"]["train_split"], metrics["data"]["test_split"]) == (2000, 1000)   # the slice
    log = [json.loads(line) for line in (gessl_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(math.isfinite(r["kl"]) and r["kl"] >= 0 and math.isfinite(r["ssl_loss"]) for r in log)
    assert log[0]["kl"] == pytest.approx(log[0]["loss"])
    for png in ("loss.png", "accuracy.png"):
        assert (gessl_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (gessl_run / "checkpoint.pt").is_file()
    from gessl_ext.train.config import OPTION_BY_KEY, resolve

    again = resolve({"config": str(gessl_run / "config.yaml")})      # the written config reproduces the run
    assert {k: again[k] for k in OPTION_BY_KEY} == {k: metrics["config"][k] for k in OPTION_BY_KEY}


def test_resume_gives_the_uninterrupted_result(tiny, gessl_run, tmp_path, capsys):
    out = tmp_path / "resumed"
    first = run_ok(capsys, tiny + ["--epochs", "1", "--out", str(out)])
    assert first["epochs_completed"] == 1
    second = run_ok(capsys, ["--resume", "--out", str(out), "--epochs", "2"])   # the rest from out/config.yaml
    full = json.loads((gessl_run / "metrics.json").read_text())
    timing = {"train_seconds", "eval_seconds"}
    assert [{k: v for k, v in h.items() if k not in timing} for h in second["history"]] == \
        [{k: v for k, v in h.items() if k not in timing} for h in full["history"]]
    ours = torch.load(out / "checkpoint.pt", weights_only=True)
    reference = torch.load(gessl_run / "checkpoint.pt", weights_only=True)
    for key, value in reference["step"].items():
        assert torch.equal(ours["step"][key], value), key
    moments = [s["momentum_buffer"] for s in reference["optimizer"]["state"].values()]
    assert all(torch.equal(a["momentum_buffer"], b) for a, b in zip(ours["optimizer"]["state"].values(), moments))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    ref_log = [json.loads(line) for line in (gessl_run / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"], r["kl"]) for r in log] == [(r["step"], r["loss"], r["kl"]) for r in ref_log]


def test_plain_ssl_with_a_stateful_objective_resumes_exactly(tiny, tmp_path, capsys):
    args = tiny + ["--no-gessl", "--method", "moco", "--moco-queue", "64", "--no-eval-initial", "--eval-every", "0"]
    full = run_ok(capsys, args + ["--epochs", "2", "--out", str(tmp_path / "full")])
    run_ok(capsys, args + ["--epochs", "1", "--out", str(tmp_path / "part")])
    part = run_ok(capsys, args + ["--epochs", "2", "--out", str(tmp_path / "part"), "--resume"])
    assert full["config"]["gessl"] is False and "kl" not in (tmp_path / "full" / "log.jsonl").read_text()
    check_entry(full["final"])
    assert part["final"]["knn_accuracy"] == full["final"]["knn_accuracy"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["step"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["step"]
    assert any("queue" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_occupied_out_other_settings_and_a_finished_run_change_nothing(tiny, gessl_run, capsys):
    before = snapshot(gessl_run)
    err = fail_line(capsys, tiny + ["--epochs", "2", "--out", str(gessl_run)])
    assert "already holds a run" in err
    err = fail_line(capsys, tiny + ["--epochs", "3", "--task-size", "4", "--out", str(gessl_run), "--resume"])
    assert "settings differ" in err and "--task-size 4 given, 8 in the run" in err
    err = fail_line(capsys, ["--epochs", "3", "--method", "byol", "--out", str(gessl_run), "--resume"])
    assert "--method 'byol' given, 'simclr' in the run" in err
    # resuming the finished run: nothing to do, every file byte-identical with its old modification time
    for args in (["--resume", "--out", str(gessl_run)], tiny + ["--epochs", "2", "--resume", "--out", str(gessl_run)]):
        assert train_main(args) == 0
        said = capsys.readouterr()
        assert "already finished (2 epochs, 4 steps); nothing to do and no file changed" in said.out, said
        assert said.err == ""
    assert snapshot(gessl_run) == before


def test_the_checkpoint_guards_against_an_edited_config_yaml(gessl_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(gessl_run, out)
    (out / "metrics.json").unlink()                 # not finished, so --resume would train
    config = out / "config.yaml"
    config.write_text(config.read_text().replace("task_size: 8", "task_size: 4"))
    before = snapshot(out)
    err = fail_line(capsys, ["--resume", "--epochs", "3", "--out", str(out)])
    assert "is from a different config (task_size: 8 in the checkpoint, 4 now)" in err
    assert snapshot(out) == before


@pytest.mark.parametrize("main", [train_main, compare_main])
@pytest.mark.parametrize("absent,extra,named", [
    (["matplotlib"], [], "matplotlib"),
    (["tqdm", "yaml"], [], "yaml (PyYAML), tqdm"),
    (["yaml"], ["--config", "run.yaml"], "yaml (PyYAML)"),
    (["torchvision"], ["--backbone", "resnet50"], "torchvision"),
])
def test_a_missing_optional_dependency_stops_before_any_work(tiny, monkeypatch, tmp_path, capsys, main, absent,
                                                            extra, named):
    import sys

    for name in absent:
        monkeypatch.setitem(sys.modules, name, None)     # `import name` now raises ModuleNotFoundError
    out = tmp_path / "out"
    err = fail_line(capsys, tiny + extra + ["--out", str(out)], main=main)
    assert f"missing optional dependencies: {named}; install the main job's extra with pip install " \
           "'gessl_ext[train]' (nothing was run)" in err
    assert not out.exists()


def test_a_plotting_failure_keeps_the_results_and_says_so(tiny, monkeypatch, tmp_path, capsys):
    """The dependency check imports matplotlib; pyplot failing later (a broken backend) loses nothing.
    torchvision is absent too: the convnet run does not need it."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    out = tmp_path / "noplots"
    assert train_main(tiny + ["--no-gessl", "--epochs", "1", "--no-eval-initial", "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gessl-train: warning: the plots in {out} were not drawn (ModuleNotFoundError: ") \
        and err.endswith("metrics.json, log.jsonl and checkpoint.pt are complete") and len(err.splitlines()) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] is True and metrics["steps"] == 2
    check_entry(metrics["final"])
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.yaml", "log.jsonl", "metrics.json"]


def test_the_nonsmooth_note_names_the_cli_flag(tiny, capsys):
    from gessl_ext.train.config import resolve
    from gessl_ext.train.trainer import NONSMOOTH_NOTE, Run

    def notes(*extra):
        return Run(resolve(vars(train_parser().parse_args(tiny + list(extra) + ["--out", "unused"])))).notes

    assert notes() == [NONSMOOTH_NOTE] and "--no-warn-nonsmooth" in NONSMOOTH_NOTE   # fd on the ReLU convnet
    assert "warn_nonsmooth=False" not in NONSMOOTH_NOTE
    assert notes("--no-warn-nonsmooth") == [] and notes("--hypergrad", "hvp") == []


def test_corrupt_checkpoint_and_nothing_to_resume(tiny, tmp_path, capsys):
    out = tmp_path / "broken"
    out.mkdir()
    err = fail_line(capsys, tiny + ["--out", str(out), "--resume"])
    assert "--resume: no run to continue in" in err
    from gessl_ext.train.config import OPTION_BY_KEY, resolve
    from gessl_ext.train.report import write_yaml

    cfg = resolve(vars(train_parser().parse_args(tiny + ["--out", str(out)])))
    write_yaml(out / "config.yaml", {k: cfg[k] for k in OPTION_BY_KEY})
    err = fail_line(capsys, tiny + ["--out", str(out), "--resume"])
    assert "no checkpoint.pt" in err
    (out / "checkpoint.pt").write_bytes(b"garbage")
    err = fail_line(capsys, tiny + ["--out", str(out), "--resume"])
    assert "cannot read checkpoint" in err
    assert (out / "checkpoint.pt").read_bytes() == b"garbage"


@pytest.mark.parametrize("extra,match", [
    (["--method", "dino"], "--method .*unknown value 'dino'"),
    (["--backbone", "vit"], "--backbone .*unknown value 'vit'"),
    (["--data", "imagenet-21k"], "unknown dataset 'imagenet-21k'"),
    (["--train-subset", "10"], "2 x --task-size 8 = 16 images per step, but the pre-training set holds only 10"),
    (["--fewshot-classes", "5-7"], "5-way few-shot needs 5 unseen classes, only 3"),
    (["--fewshot-queries", "40"], "needs 41 images per unseen class, the smallest has 30"),
    (["--train-classes", "0-12"], "class 10 out of range"),
    (["--backbone", "conv4"], "conv4 needs image_size >= 16"),
    (["--hypergrad", "exact"], "--hypergrad .*unknown value 'exact'"),
    (["--epochs", "0"], "--epochs .*must be >= 1"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--data", "cifar10", "--data-dir", "/nonexistent"], "cifar10 not found: missing data_batch_1"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, capsys, extra, match):
    import re

    out = tmp_path / "out"
    err = fail_line(capsys, tiny + extra + ["--out", str(out)])
    assert re.search(match, err), err
    assert not out.exists()


def test_unreadable_data_files(tiny, tmp_path, capsys):
    import shutil

    data_dir = tmp_path / "fmnist"
    shutil.copytree(tiny[tiny.index("--data-dir") + 1], data_dir)
    labels = data_dir / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-100])
    err = fail_line(capsys, tiny + ["--data-dir", str(data_dir), "--out", str(tmp_path / "a")])
    assert "t10k-labels-idx1-ubyte" in err and "truncated" in err
    images = tmp_path / "images"
    for cls in ("a", "b"):
        (images / cls).mkdir(parents=True)
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(images / "a" / f"{i}.png")
        Image.new("RGB", (16, 16), (0, i * 40, 0)).save(images / "b" / f"{i}.png")
    (images / "b" / "3.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    err = fail_line(capsys, tiny + ["--data", str(images), "--out", str(tmp_path / "b")])
    assert "3.jpg" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_compare_tables_at_equal_epochs_and_equal_time(tiny, tmp_path, capsys):
    args = tiny + ["--epochs", "1", "--seeds", "0,1", "--hypergrad-methods", "fd,hvp", "--out", str(tmp_path),
                   "--no-eval-initial"]
    assert compare_main(args) == 0, capsys.readouterr().err
    text = (tmp_path / "compare.md").read_text()
    assert "equal epochs (1 epochs)" in text and "equal training time" in text
    for variant in ("ssl", "gessl-fd", "gessl-hvp"):
        assert f"| {variant} |" in text
    table = json.loads((tmp_path / "compare.json").read_text())
    equal_epochs, equal_time = table["equal epochs"], table["equal training time"]
    for seed_index in range(2):
        budget = max(equal_epochs[v][seed_index]["train_seconds"] for v in equal_epochs)
        for variant in equal_time:
            entry = equal_time[variant][seed_index]
            assert entry["train_seconds"] >= 0.97 * budget or entry["epoch"] == 1
            check_entry(entry)
        # the plain step is cheaper, so at equal time it has trained more epochs than GeSSL
        assert equal_time["ssl"][seed_index]["epoch"] > 1
        ref = equal_epochs["ssl"][seed_index]["one_step_accuracy_train"]
        fd = equal_epochs["gessl-fd"][seed_index]
        assert fd["ratio_r"] == pytest.approx(ref / fd["one_step_accuracy_train"])
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # a second call reuses the finished runs (no retraining, same table)
    assert compare_main(args) == 0
    assert json.loads((tmp_path / "compare.json").read_text()) == table
    capsys.readouterr()
    err = fail_line(capsys, args[:-1] + ["--seed", "3", "--no-eval-initial"], main=compare_main)
    assert "--seeds" in err


def test_torchrun_two_ranks_match_one_process(tiny, gessl_run, tmp_path):
    """Two gloo ranks on the CPU, one task each: the same weights as one process running both tasks."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "gessl_ext.train", *tiny, "--epochs", "2", "--no-eval-initial", "--eval-every", "0", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[:1500] + "\n[...]\n" + done.stderr[-1500:]   # the ranks' own lines come first
    assert done.stdout.count("4 steps in") == 1                    # rank 0 alone reports
    ours = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    reference = torch.load(gessl_run / "checkpoint.pt", weights_only=True)["step"]
    for key, value in reference.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "checkpoint.pt", "config.yaml", "log.jsonl",
                                                     "loss.png", "metrics.json"]


@pytest.mark.parametrize("flag", ["--resume", "--gessl", "--no-gessl", "--time-budget"])
def test_compare_offers_no_flag_for_what_it_sets_itself(flag):
    from gessl_ext.train.cli import compare_parser
    from gessl_ext.train.config import ConfigError

    assert flag not in compare_parser().format_help()
    with pytest.raises(ConfigError, match=f"unrecognized arguments: {flag}"):
        compare_parser().parse_args([flag] + (["5"] if flag == "--time-budget" else []))
