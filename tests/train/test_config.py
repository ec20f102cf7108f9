"""Settings: defaults < --quick < --config file < command line, validation, resume identity."""
import pytest

from gessl_ext.train.config import QUICK, ConfigError, defaults, resolve, training_identity


def test_paper_defaults():
    cfg = resolve({})
    assert (cfg["tasks"], cfg["task_size"], cfg["inner_steps"], cfg["target_steps"]) == (8, 32, 1, 10)
    assert (cfg["momentum"], cfg["weight_decay"], cfg["head_temperature"]) == (0.9, 1e-4, 0.1)
    assert cfg["gessl"] is True and cfg["method"] == "simclr" and cfg["out"] == "runs/simclr-gessl-seed0"


def test_precedence_quick_then_file_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("quick: true\ntask-size: 16\nepochs: 7\ngessl: false\nfewshot_shots: [1, 3]\n")
    cfg = resolve({"config": str(path), "epochs": "9", "tasks": "3"})
    assert cfg["quick"] and cfg["train_subset"] == QUICK["train_subset"]          # from --quick
    assert cfg["task_size"] == 16 and cfg["gessl"] is False                       # from the file
    assert cfg["epochs"] == 9 and cfg["tasks"] == 3                               # flags win
    assert cfg["fewshot_shots"] == [1, 3]
    assert resolve({"fewshot_shots": "2,4"})["fewshot_shots"] == [2, 4]
    assert cfg["out"] == "runs/simclr-ssl-seed0"


@pytest.mark.parametrize("text,match", [
    ("epoch: 3\n", "unknown setting 'epoch'"),
    ("epochs: many\n", "--epochs .*invalid int value 'many'"),
    ("epochs: 2.5\n", "--epochs .*invalid int"),
    ("method: dino\n", "unknown value 'dino'; choose one of simclr"),
    ("task_size: 1\n", "--task-size .*must be >= 2"),
    ("lr: .nan\n", "--lr .*invalid float"),
    ("- 1\n- 2\n", "must hold a mapping"),
    ("epochs: [1\n", "not valid YAML"),
    ("quick: 3\n", "quick in config file"),
])
def test_bad_config_files(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        resolve({"config": str(path)})


def test_bad_flags_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="--inner-lr .*must be >= 1e-12"):
        resolve({"inner_lr": "0"})
    with pytest.raises(ConfigError, match="--gessl"):
        resolve({"gessl": "maybe"})
    with pytest.raises(ConfigError, match="cannot read config file"):
        resolve({"config": str(tmp_path / "none.yaml")})


def test_training_identity_ignores_only_resumable_settings():
    a = resolve({})
    b = {**a, "epochs": 50, "eval_every": 3, "out": "elsewhere", "device": "cpu", "progress": False,
         "time_budget": 10.0}
    assert training_identity(a) == training_identity(b)
    for key, value in (("task_size", 16), ("seed", 1), ("hypergrad", "hvp"), ("lr", 0.1), ("fewshot_ways", 3)):
        assert training_identity(a) != training_identity({**a, key: value}), key
    cosine = {**a, "lr_schedule": "cosine"}
    assert training_identity(cosine) != training_identity({**cosine, "epochs": 50})
    assert set(defaults()) <= set(a)


def test_retain_freed_memory_is_on_by_default_and_can_be_turned_off():
    from gessl_ext.train.cli import train_parser

    assert resolve({})["retain_freed_memory"] is True
    given = vars(train_parser().parse_args(["--no-retain-freed-memory"]))
    assert resolve(given)["retain_freed_memory"] is False
    assert "retain_freed_memory" not in training_identity(resolve({}))   # may change on --resume


def test_resume_takes_the_runs_settings_and_refuses_other_values(tmp_path):
    from gessl_ext.train.config import OPTION_BY_KEY
    from gessl_ext.train.report import write_yaml

    out = tmp_path / "quick"
    out.mkdir()
    with pytest.raises(ConfigError, match=f"--resume: no run to continue in {out}"):
        resolve({"resume": True, "out": str(out)})
    started = resolve({"quick": True, "task_size": "16", "out": str(out)})
    write_yaml(out / "config.yaml", {k: started[k] for k in OPTION_BY_KEY})      # what gessl-train writes
    resumed = resolve({"resume": True, "out": str(out)})                          # nothing typed again
    assert {k: resumed[k] for k in OPTION_BY_KEY} == {k: started[k] for k in OPTION_BY_KEY}
    assert resumed["resume"] is True
    again = resolve({"quick": True, "task_size": "16", "resume": True, "out": str(out)})   # the same flags agree
    assert training_identity(again) == training_identity(started)
    changed = resolve({"resume": True, "out": str(out), "epochs": "5", "eval_every": "0", "progress": False})
    assert (changed["epochs"], changed["eval_every"], changed["progress"]) == (5, 0, False)
    assert training_identity(changed) == training_identity(started)
    with pytest.raises(ConfigError, match=r"--task-size 4 given, 16 in the run; --seed 3 given, 0 in the run\); "
                                          r"on --resume only .*--epochs, .*--eval-every, --time-budget, --progress"):
        resolve({"resume": True, "out": str(out), "task_size": "4", "seed": "3"})
    with pytest.raises(ConfigError, match="--task-size 32 given, 16"):          # --quick alone means N = 32
        resolve({"resume": True, "out": str(out), "quick": True})
    cosine = resolve({"quick": True, "lr_schedule": "cosine", "out": str(out)})
    write_yaml(out / "config.yaml", {k: cosine[k] for k in OPTION_BY_KEY})
    with pytest.raises(ConfigError, match=r"--epochs 5 given, 2 in the run\).*not under --lr-schedule cosine"):
        resolve({"resume": True, "out": str(out), "epochs": "5"})
