import pytest

from metadyn.config import from_dict, load_task, parse_override, set_dotted
from metadyn.errors import InputError
from metadyn.runner.kinds.anytime import AnytimeConfig

TASK = """
task: t
kind: anytime
data: {name: digits}
model: {backbone: mlp, options: {hidden: [8, 8]}}
train: {epochs: 2, lr: 0.1}
quick: {train.epochs: 1}
"""


def _write(tmp_path, text):
    p = tmp_path / "t.yaml"
    p.write_text(text)
    return p


def test_load_validates_and_overrides(tmp_path):
    p = _write(tmp_path, TASK)
    cfg = load_task(p)
    assert isinstance(cfg, AnytimeConfig)
    assert cfg.train.epochs == 2 and cfg.train.lr == 0.1 and cfg.model.options == {"hidden": [8, 8]}
    assert load_task(p, quick=True).train.epochs == 1
    cfg = load_task(p, ["train.lr=1e-3", "model.options.hidden=[4]", "eval.calibrate=false"], quick=True)
    assert cfg.train.lr == 1e-3 and cfg.model.options["hidden"] == [4] and cfg.eval.calibrate is False
    assert isinstance(load_task(p, ["train.lr=1"]).train.lr, float)  # ints are accepted as numbers


@pytest.mark.parametrize("text, message", [
    ("train: {epoch: 3}", "unknown key 'train.epoch' (did you mean 'epochs'?)"),
    ("train: {epochs: three}", "'train.epochs' must be an integer, got str 'three'"),
    ("train: {epochs: 2.5}", "'train.epochs' must be an integer"),
    ("eval: {calibrate: 1}", "'eval.calibrate' must be true/false"),
    ("data: digits", "'data' must be a mapping"),
    ("seeds: 3", "unknown key 'seeds' (did you mean 'seed'?)"),
    ("kind: fewshots", "unknown task kind 'fewshots'"),
    ("train: {lr: [1]}", "'train.lr' must be a number"),
])
def test_bad_task_files_name_the_key(tmp_path, text, message):
    with pytest.raises(InputError) as e:
        load_task(_write(tmp_path, text))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="not valid YAML at line 2"):
        load_task(_write(tmp_path, "a: 1\n b: [2\n"))
    with pytest.raises(InputError, match="must hold a mapping"):
        load_task(_write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(InputError, match="does not exist"):
        load_task(tmp_path / "nope.yaml")
    # no YAML tag can run code
    with pytest.raises(InputError, match="not valid YAML"):
        load_task(_write(tmp_path, "seed: !!python/object/apply:os.system ['echo hi']\n"))


def test_overrides_parsing():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("x=none") == ("x", "none")
    with pytest.raises(InputError, match="key=value"):
        parse_override("novalue")
    d = {"a": 1}
    with pytest.raises(InputError, match="'a' is not a mapping"):
        set_dotted(d, "a.b", 2)


def test_from_dict_nested_default():
    cfg = from_dict(AnytimeConfig, {})
    assert cfg.data.name == "digits" and cfg.model.backbone == "resnet"


def test_nested_defaults_are_updated_not_replaced(tmp_path):
    from metadyn.runner.kinds.skipping import SkipNetConfig

    cfg = from_dict(SkipNetConfig, {"hybrid": {"epochs": 3}})
    assert cfg.hybrid.epochs == 3 and cfg.hybrid.optimizer == "adam" and cfg.hybrid.weight_decay == 0.0
    assert SkipNetConfig().hybrid.epochs == 10  # the default instance was not touched


@pytest.mark.parametrize("text, message", [
    ("train: {epochs: -1}", "'train.epochs' must be >= 0, got -1"),
    ("train: {lr: .nan}", "'train.lr' must be a finite number"),
    ("train: {schedule: linear}", "unknown train.schedule 'linear'"),
    ("eval: {policy: margin}", "unknown eval.policy 'margin'"),
    ("seed: -3", "'seed' must be >= 0"),
])
def test_declared_field_checks_name_the_key(tmp_path, text, message):
    with pytest.raises(InputError) as e:
        key = text.split(":")[0]  # the task file's own line of that key is replaced (a key may appear once)
        load_task(_write(tmp_path, "".join(line + "\n" for line in TASK.splitlines() if not line.startswith(key + ":"))
                         + text))
    assert message in str(e.value) and "\n" not in str(e.value)
