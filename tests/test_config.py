from pathlib import Path

import pytest

from gpt.config import PRESETS, apply_overrides, build_config, dump_yaml, load_config, read_yaml, to_dict
from gpt.errors import GptError
from gpt.training.objectives import start_differences

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.fixture
def host(monkeypatch):
    """Pretend to be a CPU with native bf16 (True) or without (False)."""
    return lambda native: monkeypatch.setattr("gpt.device.cpu_has_native_bf16", lambda: native)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_with_the_values_it_sets(path, host):
    host(False)
    raw = read_yaml(path)
    raw.pop("hosts", None)  # tested below
    resolved = to_dict(load_config(path))
    for section, body in raw.items():
        for key, value in body.items():
            expected = float(value) if isinstance(resolved[section][key], float) else value
            assert resolved[section][key] == expected, f"{section}.{key}"


def test_a_hosts_section_sets_what_it_names_on_that_kind_of_host_only_and_says_so(tmp_path, host):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  dropout: 0.0\nhosts:\n  cpu_bf16:\n    model.dropout: 0.1\n    train.lr: 1e-3\n"
                    "  cuda:\n    train.batch_size: 8\n")
    said = []
    host(True)
    config = load_config(path, say=said.append)
    assert (config.model.dropout, config.train.lr, config.train.batch_size) == (0.1, 1e-3, 64)  # the default
    assert said == ["host: a CPU with native bf16 (AVX512-BF16 or AMX): the config's hosts.cpu_bf16 sets "
                    "model.dropout=0.1, train.lr=1e-3 (the command line overrides it)"]
    assert load_config(path, ["model.dropout=0.2"]).model.dropout == 0.2  # the command line has the last word
    host(False)
    said.clear()
    assert load_config(path, say=said.append).model.dropout == 0.0 and said == []


def test_the_shipped_char_config_changes_its_recipe_where_bf16_is_native_only(host):
    path = Path(__file__).resolve().parent.parent / "configs" / "shakespeare_char.yaml"

    def recipe():
        config = load_config(path)
        model = config.model
        train = config.train
        return (model.n_layer, model.dropout, model.attn_dropout, model.block_size,
                train.batch_size, train.weight_decay, train.min_lr)

    host(True)
    assert recipe() == (6, 0.1, 0.0, 256, 8, 0.1, 2e-4)
    host(False)
    assert recipe() == (4, 0.0, None, 128, 16, 0.5, 2e-5)


@pytest.mark.parametrize("hosts, message", [
    ("  cpu_bf17:\n    model.dropout: 0.1", "hosts: unknown host kind 'cpu_bf17'; did you mean 'cpu_bf16'"),
    ("  cuda:\n    model.dropuot: 0.1", "unknown config key 'model.dropuot'; did you mean 'model.dropout'"),
    ("  cuda:\n    dropout: 0.1", "hosts.cuda: 'dropout' is not of the form section.key"),
    ("  - cuda", "config section 'hosts' must map host kinds to settings"),
])
def test_a_bad_hosts_section_is_one_line(tmp_path, hosts, message):
    path = tmp_path / "c.yaml"
    path.write_text("hosts:\n" + hosts + "\n")
    with pytest.raises(GptError, match=message):
        load_config(path)


def test_required_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"shakespeare_char.yaml", "shakespeare_gpt2bpe.yaml", "gpt2_124m.yaml", "gpt1.yaml"} <= names


@pytest.mark.parametrize("native_bf16", [False, True], ids=["cpu", "cpu_bf16"])
def test_a_shipped_fine_tune_config_has_the_shape_of_the_shipped_run_it_starts_from(host, native_bf16):
    host(native_bf16)  # the base recipe's shape may differ by host: its fine-tunes must follow it
    configs = {path.name: load_config(path) for path in CONFIGS}
    runs = {c.train.out_dir: name for name, c in configs.items()}
    pairs = [(name, runs[c.train.init_from]) for name, c in configs.items() if c.train.init_from in runs]
    assert ("finetune_speaker.yaml", "shakespeare_char.yaml") in pairs
    for fine_tune, base in pairs:
        differ = [n for n in start_differences(configs[base].model, configs[fine_tune]) if n != "vocab_size"]
        assert not differ, f"{fine_tune} starts from {base}'s run but its model differs in {differ}"


def test_overrides_convert_types():
    raw = apply_overrides({}, ["train.lr=3e-4", "model.n_layer=4", "model.bias=true", "train.lr_decay_iters=null",
                               "sample.stop=[a, b]", "sample.top_k=none", "train.compile=false"])
    config = build_config(raw)
    assert config.train.lr == 3e-4 and isinstance(config.train.lr, float)
    assert config.model.n_layer == 4 and config.model.bias is True
    assert config.train.lr_decay_iters is None and config.sample.top_k is None
    assert config.sample.stop == ["a", "b"] and config.train.compile is False


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 3e-4\n")
    assert load_config(path).train.lr == 3e-4


@pytest.mark.parametrize("override, hint", [("model.n_layers=4", "did you mean 'model.n_layer'"),
                                            ("trian.lr=1", "did you mean 'train'"),
                                            ("train.zzz=1", "known keys: train.out_dir")])
def test_unknown_keys_get_a_suggestion(override, hint):
    with pytest.raises(GptError, match=hint):
        load_config(None, [override])


@pytest.mark.parametrize("override, message", [
    ("model.n_layer=four", "model.n_layer: invalid value 'four'; expected an integer"),
    ("model.n_embd=100", "divisible by model.n_head"),
    ("model.pos_encoding=alibi", "choose one of learned, sinusoidal, rope"),
    ("train.lr=-1", "train.lr must be positive"),
    ("model.dropout=1.5", "model.dropout must be in"),
    ("train.bias", "section.key=value"),
    ("sample.top_p=0", "top_p must be in"),
    ("train.max_minutes=0", "train.max_minutes must be positive or null"),
    ("train.optimizer=sgd", "choose one of adamw, muon"),
    ("train.muon_lr=0", "train.muon_lr must be positive"),
    ("model.logit_softcap=-5", "model.logit_softcap must be positive or null"),
    ("model.activation=swish", "choose one of gelu, gelu_tanh, relu, relu2"),
    ("train.lr_decay_iters=50", "train.lr_decay_iters=50 ends the cosine decay before train.warmup_iters=100"),
    ("train.lr_decay_iters=100", "make train.lr_decay_iters larger or train.warmup_iters smaller"),
])
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(GptError, match=message.replace("(", r"\(").replace("[", r"\[")) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


def test_preset_expands_and_explicit_fields_win():
    config = build_config({"model": {"preset": "gpt2", "n_layer": 2}})
    assert config.model.n_embd == 768 and config.model.block_size == 1024 and config.model.n_layer == 2


def test_unknown_preset_suggests_a_name():
    with pytest.raises(GptError, match="did you mean 'gpt2'"):
        build_config({"model": {"preset": "gtp2"}})


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = load_config(None, ["model.preset=gpt2-medium", "train.lr=1e-4", "sample.stop=[END]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(config))
    assert load_config(path) == config


def test_bad_yaml_is_reported_with_its_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  n_layer: [1,\n")
    with pytest.raises(GptError, match="invalid YAML at line"):
        read_yaml(path)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_sets_its_fields(name):
    model = to_dict(build_config({"model": {"preset": name}}))["model"]
    assert {key: model[key] for key in PRESETS[name]} == PRESETS[name]


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("gpt")])
def test_paper_presets_keep_the_modern_options_off(name):
    model = build_config({"model": {"preset": name}}).model
    assert (model.qk_norm, model.zero_init_proj, model.logit_softcap) == (False, False, None)
    assert model.activation in ("gelu", "gelu_tanh") and build_config({}).train.optimizer == "adamw"
