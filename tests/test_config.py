"""Settings: defaults, YAML < env < keyword overrides, clear errors, field-by-field merge."""

from __future__ import annotations

from pathlib import Path

import pytest

from findistil.config import (
    MINILM,
    SMOLLM2,
    DataSplitConfig,
    find_config_file,
    load_settings,
    merge_split_config,
)
from findistil.errors import ConfigError

YAML = """
home: {home}
database_url: postgresql+psycopg://u@h/db
data_split_config:
  eval_size: 7
  val_ratio: 0.2
training_config:
  epochs: 3
nims:
  - model_name: org/custom-model
    kind: causal_lm
    gpus: 2
    training_config: {{learning_rate: 0.01}}
"""


@pytest.fixture
def yaml_file(tmp_path) -> Path:
    path = tmp_path / "findistil.yaml"
    path.write_text(YAML.format(home=tmp_path / "yhome"))
    return path


def test_defaults_are_upstream_financial_values(findistil_home):
    s = load_settings()
    assert s.home == findistil_home
    assert s.db_url == f"sqlite:///{findistil_home / 'findistil.db'}"
    assert s.datasets_dir == findistil_home / "datasets"
    assert s.data_split_config == DataSplitConfig(
        eval_size=100, val_ratio=0.1, min_total_records=50, random_seed=42, limit=None
    )
    t, lora = s.training_config, s.lora_config
    assert (t.training_type, t.finetuning_type, t.epochs, t.batch_size, t.learning_rate) == (
        "sft",
        "lora",
        1,
        64,
        1e-4,
    )
    assert (lora.adapter_dim, lora.adapter_dropout, lora.sequence_packing_enabled) == (
        16,
        0.1,
        True,
    )
    assert [n.model_name for n in s.nims] == [SMOLLM2, MINILM]
    assert s.evaluation_config.workload_type == "auto"


def test_yaml_file_found_in_cwd_and_read(yaml_file, tmp_path, monkeypatch):
    monkeypatch.delenv("FINDISTIL_HOME")
    assert find_config_file() == Path("findistil.yaml")  # conftest chdir'ed to tmp_path
    s = load_settings()
    assert s.home == tmp_path / "yhome"
    assert s.db_url == "postgresql+psycopg://u@h/db"
    assert s.data_split_config.eval_size == 7 and s.data_split_config.val_ratio == 0.2
    assert s.data_split_config.min_total_records == 50  # untouched keys keep defaults
    (nim,) = s.nims
    assert nim.gpus == 2  # unknown upstream keys of a NIM are kept
    assert s.training_for(nim).learning_rate == 0.01 and s.training_for(nim).epochs == 3


def test_precedence_yaml_then_env_then_overrides(yaml_file, monkeypatch, tmp_path):
    monkeypatch.setenv("FINDISTIL_DATA_SPLIT_CONFIG__EVAL_SIZE", "20")
    monkeypatch.setenv("FINDISTIL_DATABASE_URL", "sqlite:///env.db")
    s = load_settings(yaml_file)
    assert s.home == tmp_path / "home"  # env FINDISTIL_HOME (conftest) beats the file
    assert s.data_split_config.eval_size == 20  # env beats yaml ...
    assert s.data_split_config.val_ratio == 0.2  # ... key by key
    assert s.db_url == "sqlite:///env.db"
    s = load_settings(yaml_file, data_split_config={"eval_size": 3}, database_url="sqlite://")
    assert s.data_split_config.eval_size == 3 and s.data_split_config.val_ratio == 0.2
    assert s.db_url == "sqlite://"


def test_config_env_var_names_the_file(yaml_file, monkeypatch):
    monkeypatch.chdir(yaml_file.parent.parent)
    monkeypatch.setenv("FINDISTIL_CONFIG", str(yaml_file))
    assert load_settings().data_split_config.eval_size == 7


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"data_split_config": {"eval_size": -1}}, "data_split_config.eval_size"),
        ({"data_split_config": {"val_ratio": 1.0}}, "data_split_config.val_ratio"),
        ({"data_split_config": {"val_ratio": -0.1}}, "data_split_config.val_ratio"),
        ({"data_split_config": {"bogus": 1}}, "data_split_config.bogus"),
        ({"data_split_config": {"limit": 10}}, "limit (10) must be >= min_total_records"),
        ({"evaluation_config": {"workload_type": "summary"}}, "evaluation_config.workload_type"),
        ({"training_config": {"learning_rate": 0}}, "training_config.learning_rate"),
        ({"lora_config": {"adapter_dropout": 1.5}}, "lora_config.adapter_dropout"),
        ({"icl_config": {"reserved_tokens": 9000}}, "reserved_tokens must be smaller"),
        ({"max_parallel_jobs": 0}, "max_parallel_jobs"),
    ],
)
def test_invalid_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match="invalid configuration") as err:
        load_settings(**overrides)
    assert key in str(err.value)


def test_invalid_env_value_names_the_key(monkeypatch):
    monkeypatch.setenv("FINDISTIL_DATA_SPLIT_CONFIG__VAL_RATIO", "abc")
    with pytest.raises(ConfigError, match=r"data_split_config\.val_ratio.*'abc'"):
        load_settings()


def test_bad_or_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(": [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")


def test_merge_split_config_field_by_field():
    base = DataSplitConfig(eval_size=30, val_ratio=0.2, limit=500, random_seed=7)
    merged = merge_split_config(base, {"eval_size": 5})
    assert merged.eval_size == 5
    assert (merged.val_ratio, merged.limit, merged.random_seed) == (0.2, 500, 7)
    assert merge_split_config(base, None) == base
    assert merge_split_config(base, {}) == base
    assert base.eval_size == 30  # the configured one is not modified
    with pytest.raises(ConfigError, match=r"data_split_config\.val_ratio"):
        merge_split_config(base, {"val_ratio": 2})
    with pytest.raises(ConfigError, match=r"data_split_config\.nope"):
        merge_split_config(base, {"nope": 1})
    with pytest.raises(ConfigError, match="limit"):
        merge_split_config(base, {"limit": 10})


# An upstream-style config.yaml: the financial blueprint's keys and values (REFERENCE §9, §11).
UPSTREAM_YAML = """
nmp_config:
  nemo_base_url: http://nemo.test
  nim_base_url: http://nim.test
  datastore_base_url: http://data-store.test
  nmp_namespace: mdfd
logging_config: {level: INFO}
llm_judge_config: {deployment_type: remote, url: http://judge.test/v1, model_name: judge}
data_split_config:
  eval_size: 100
  val_ratio: 0.1
  min_total_records: 50
  random_seed: null
  limit: null
icl_config:
  max_examples: 3
  example_selection: uniform_distribution
  similarity_config:
    relevance_ratio: 0.7
    embedding_nim_config: {model_name: nvidia/llama-3.2-nv-embedqa-1b-v2}
evaluation_config: {workload_type: classification, tool_eval_type: tool-calling-metric}
mlflow_config: {enabled: false, tracking_uri: "http://0.0.0.0:5000"}
"""


def test_an_upstream_config_loads_with_its_values_mapped(tmp_path, caplog):
    path = tmp_path / "upstream.yaml"
    path.write_text(UPSTREAM_YAML + "nmp_confg: {}\n")  # and a typo of a key
    with caplog.at_level("WARNING", logger="findistil.config"):
        settings = load_settings(path)
        load_settings(path)  # a second load warns no more
    assert settings.icl_config.example_selection == "uniform"
    assert settings.icl_config.relevance_ratio == 0.7
    assert settings.data_split_config.random_seed is None
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 4, warned  # once per ignored key and process
    assert any("'nmp_confg'" in w and "check its spelling" in w for w in warned)
    assert any("'nmp_config'" in w and "upstream key" in w for w in warned)

    # null seed: each job draws one and freezes it, so its record reproduces it
    seeds = {settings.job_config().data_split_config.random_seed for _ in range(5)}
    assert None not in seeds and len(seeds) > 1
    assert settings.job_config({"random_seed": 7}).data_split_config.random_seed == 7


def test_semantic_selection_without_similarity_config_is_pure_nearness():
    from findistil.config import ICLConfig

    assert ICLConfig(example_selection="semantic_similarity").relevance_ratio == 1.0
    null_ratio = ICLConfig(similarity_config={"relevance_ratio": None})
    assert null_ratio.relevance_ratio == 0.7  # upstream's default
    with pytest.raises(ValueError, match="relevance_ratio"):
        ICLConfig(similarity_config={"relevance_ratio": 1.5})
