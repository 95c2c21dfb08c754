"""Settings: defaults = upstream's financial values, overridden by a YAML file, then env vars.

Precedence (highest first): keyword overrides passed to ``load_settings`` > environment
variables (``FINDISTIL_HOME``, ``FINDISTIL_DATABASE_URL``, nested keys with ``__``, e.g.
``FINDISTIL_DATA_SPLIT_CONFIG__EVAL_SIZE=20``) > the YAML file (``--config``,
``FINDISTIL_CONFIG`` or ``./findistil.yaml``) > defaults. Upstream key names (``nims``,
``data_split_config``, ``training_config``, ``lora_config``, ``evaluation_config``) are the
field names, so an upstream ``config.yaml`` section can be pasted in as is.

Every local file lives under ``home`` (``FINDISTIL_HOME``, default ``~/.findistil``); job
artefacts under ``artifact_root`` (default ``home``). Settings split in two: *job* settings
(candidates, split, training, LoRA, ICL, evaluation) are frozen into each job at creation
(``JobConfig``) and workers never read their own; *process* settings (home, database,
artefact root, broker, device, leases) say how this process takes part.
"""

from __future__ import annotations

import logging
import os
import secrets
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from findistil.errors import ConfigError

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSplitConfig(_Section):
    """How curated records are split (upstream ``data_split_config``)."""

    eval_size: int = Field(100, ge=1, description="records held out for evaluation")
    val_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="share of the rest for validation")
    min_total_records: int = Field(50, ge=1, description="fewer records than this fails the job")
    random_seed: int | None = Field(
        42, description="seed of sampling and splitting; null: a random one, drawn once per job"
    )
    limit: int | None = Field(None, ge=1, description="sample at most this many records")
    parse_function_arguments: bool = Field(True, description="tool calls: parse string args")
    stratify_enabled: bool = Field(True, description="class-stratified eval/val splits")
    min_samples_per_class: int = Field(2, ge=1, description="classes below this are 'others'")
    rare_class_threshold: int = Field(1, ge=0, description="classes with <= this many are rare")

    def with_seed(self) -> DataSplitConfig:
        """This config with a concrete ``random_seed``: upstream's ``null`` (random) becomes a
        seed drawn now, so the job that stores it can be reproduced from its record."""
        if self.random_seed is not None:
            return self
        return self.model_copy(update={"random_seed": secrets.randbelow(2**31)})

    @model_validator(mode="after")
    def _limit_vs_min(self) -> DataSplitConfig:
        if self.limit is not None and self.limit < self.min_total_records:
            raise ValueError(
                f"limit ({self.limit}) must be >= min_total_records ({self.min_total_records})"
            )
        return self


class TrainingConfig(_Section):
    """Fine-tuning settings (upstream ``training_config`` plus findistil's own knobs)."""

    training_type: Literal["sft"] = "sft"
    finetuning_type: Literal["lora", "all_weights"] = "lora"
    epochs: int = Field(1, ge=1, description="passes over the training set")
    batch_size: int = Field(64, ge=1, description="effective batch (gradient accumulation)")
    learning_rate: float = Field(1e-4, gt=0, description="peak AdamW learning rate")
    micro_batch_size: int = Field(16, ge=1, description="rows per forward pass")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="linear warm-up share of steps")
    weight_decay: float = Field(0.0, ge=0)
    max_seq_length: int = Field(2048, ge=16, description="longer rows are truncated")
    prompt_pruning: bool = Field(True, description="train on the variable part of prompts")
    seed: int = 42


class LoraConfig(_Section):
    """LoRA adapter settings (upstream ``lora_config``)."""

    adapter_dim: int = Field(16, ge=1, description="LoRA rank r")
    adapter_dropout: float = Field(0.1, ge=0, lt=1)
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r)")
    target_modules: str | list[str] = Field("all-linear", description="peft target_modules")
    sequence_packing_enabled: bool = Field(True, description="pack short rows into one sequence")


class SimilarityConfig(_Section):
    """Upstream's ``icl_config.similarity_config`` for ``semantic_similarity``.

    ``relevance_ratio`` of the k examples are the nearest rows; the rest go first to answer
    classes the nearest ones missed (upstream does this for tool names). The embeddings are
    computed here with ``icl_config.embedding_model``: an ``embedding_nim_config`` (a remote
    embedding NIM) is accepted so upstream configs load, and not called.
    """

    relevance_ratio: float = Field(0.7, ge=0.0, le=1.0, description="share picked by nearness")
    embedding_nim_config: dict[str, Any] | None = Field(
        None, description="upstream's remote embedder: accepted, not used (local embeddings)"
    )

    @field_validator("relevance_ratio", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any) -> Any:
        return 0.7 if value is None else value


class ICLConfig(_Section):
    """Few-shot (in-context) evaluation settings (upstream generic blueprint's ``icl_config``)."""

    max_examples: int = Field(3, ge=0)
    min_examples: int = Field(1, ge=0)
    example_selection: Literal["uniform", "semantic_similarity"] = Field(
        "uniform", description="upstream's uniform_distribution is read as uniform"
    )
    similarity_config: SimilarityConfig | None = Field(
        None, description="semantic_similarity only; none: the k nearest rows, no coverage"
    )
    max_context_length: int = Field(8192, ge=256)
    reserved_tokens: int = Field(2048, ge=0)
    embedding_model: str = MINILM

    @field_validator("example_selection", mode="before")
    @classmethod
    def _upstream_name(cls, value: Any) -> Any:
        return "uniform" if value == "uniform_distribution" else value

    @model_validator(mode="after")
    def _budget(self) -> ICLConfig:
        if self.reserved_tokens >= self.max_context_length:
            raise ValueError("reserved_tokens must be smaller than max_context_length")
        return self

    @property
    def relevance_ratio(self) -> float:
        """Share of examples chosen by nearness alone (1.0 without a similarity_config)."""
        return self.similarity_config.relevance_ratio if self.similarity_config else 1.0


class EvaluationConfig(_Section):
    """Evaluation settings (upstream ``evaluation_config`` plus generation knobs)."""

    workload_type: Literal["classification", "tool_calling", "chat", "auto"] = "auto"
    labels: list[str] | None = Field(
        None, description="classification label set (default: the financial 13, or discovered)"
    )
    tool_eval_type: str = "tool-calling-metric"
    scoring_mode: Literal["generate", "label_scores"] = Field(
        "generate", description="free generation (upstream-faithful) or rank the 13 labels"
    )
    max_new_tokens: int = Field(24, ge=1)
    batch_size: int = Field(16, ge=1)


class MlflowConfig(_Section):
    """Experiment tracking (upstream ``mlflow_config``); see ``tracking.py``.

    ``enabled`` unset means on exactly when a ``tracking_uri`` is given; ``enabled: true``
    with no ``tracking_uri`` logs to a local store under the artefact root.
    """

    enabled: bool | None = None
    tracking_uri: str | None = None
    experiment_name_prefix: str = Field("findistil", min_length=1, pattern=r"^[\w.-]+$")
    artifact_location: str | None = None

    @property
    def is_enabled(self) -> bool:
        return self.enabled if self.enabled is not None else bool(self.tracking_uri)


class CascadeConfig(_Section):
    """How a deployed student shares its route with the teacher (``cascade.py``)."""

    enabled: bool = Field(True, description="calibrate each tuned student at its eval")
    target_agreement: float = Field(
        0.97, gt=0, le=1, description="agreement with the teacher the student's share keeps"
    )
    calibration_rows: int = Field(500, ge=1, description="val rows the threshold is fitted on")


class TeacherConfig(_Section):
    """The teacher a route falls back to: any OpenAI-compatible endpoint."""

    base_url: str | None = Field(None, description="e.g. https://integrate.api.nvidia.com/v1")
    model: str | None = Field(None, description="the teacher's model name at that endpoint")
    api_key_env: str | None = Field(None, description="environment variable with its key")
    timeout_s: float = Field(60.0, gt=0)


class NimConfig(BaseModel):
    """One candidate student (upstream calls them NIMs). Strict: a misspelt key is an error
    naming it; upstream's deployment keys (``tag``, ``gpus``, ...) are accepted as they are."""

    model_config = ConfigDict(extra="forbid")

    model_name: str
    kind: str = Field("auto", description="a registered student kind, or auto (detected)")
    context_length: int = 8192
    customization_enabled: bool = True
    customizer_configs: dict[str, Any] = Field(default_factory=dict)
    queue: str | None = Field(
        None, description="Celery queue its stages go to (e.g. gpu); default task_queue"
    )
    training_config: dict[str, Any] = Field(
        default_factory=dict, description="per-candidate overrides of training_config"
    )
    lora_config: dict[str, Any] = Field(
        default_factory=dict, description="per-candidate overrides of lora_config"
    )
    # upstream's NIM deployment keys: kept for a NIM-deploying backend, unused locally
    tag: str | None = None
    gpus: int | None = None
    pvc_size: str | None = None
    registry_base: str | None = None
    model_type: Literal["llm", "embedding"] | None = None

    @field_validator("kind")
    @classmethod
    def _registered(cls, value: str) -> str:
        from findistil.students import student_kinds

        if value != "auto" and value not in student_kinds():
            raise ValueError(
                f"unknown student kind {value!r}: use auto or a registered kind "
                f"({', '.join(student_kinds())}; register_student_kind adds one)"
            )
        return value


class CandidateConfig(BaseModel):
    """A candidate as a job stores it: every setting resolved, nothing left to look up."""

    model_config = ConfigDict(extra="allow")

    model_name: str
    kind: str = "auto"
    context_length: int = 8192
    customization_enabled: bool = True
    customizer_configs: dict[str, Any] = Field(default_factory=dict)
    queue: str | None = None
    training_config: TrainingConfig = Field(default_factory=TrainingConfig)
    lora_config: LoraConfig = Field(default_factory=LoraConfig)


class JobConfig(BaseModel):
    """The frozen config of one job, stored on it at creation; every stage reads only this.

    A job can be re-run or audited from its record alone, and two workers with different
    config files run it the same way. Older jobs' partial configs read with defaults.
    """

    model_config = ConfigDict(extra="allow")

    data_split_config: DataSplitConfig = Field(default_factory=DataSplitConfig)
    nims: list[CandidateConfig] = Field(default_factory=list)
    icl_config: ICLConfig = Field(default_factory=ICLConfig)
    evaluation_config: EvaluationConfig = Field(default_factory=EvaluationConfig)
    mlflow_config: MlflowConfig = Field(default_factory=MlflowConfig)
    recommendation_tolerance: float = 0.02
    cascade: CascadeConfig = Field(default_factory=CascadeConfig)


def _default_nims() -> list[NimConfig]:
    # Per-candidate overrides, measured on this 2-core machine with the demo log (600
    # records, 1 epoch, accuracy on its 100-row eval split): SmolLM2 lr 1e-3/bs 16 0.34,
    # 1e-3/bs 8 0.59, 2e-3/bs 8 0.72; MiniLM lr 5e-5/4 epochs 0.24, 3e-4/6 epochs 0.80.
    # A 135M model needs a larger learning rate and more steps than upstream's 1B-8B
    # students, and a freshly initialised classification head needs several epochs.
    return [
        NimConfig(
            model_name=SMOLLM2,
            kind="causal_lm",
            training_config={"learning_rate": 2e-3, "batch_size": 8},
        ),
        NimConfig(
            model_name=MINILM,
            kind="encoder",
            training_config={"epochs": 6, "learning_rate": 3e-4, "batch_size": 16},
        ),
    ]


class ApiToken(_Section):
    """One bearer token of the API: ``read`` (list, get, predictions, models, chat
    completions) or ``admin`` (also create, cancel, delete, deploy, logs)."""

    token: SecretStr = Field(min_length=16, description="the secret a client sends")
    scope: Literal["read", "admin"] = "admin"
    name: str = Field("", description="who holds it (shown in logs, never the token)")


log = logging.getLogger(__name__)

# Upstream top-level keys findistil reads no value from: a pasted upstream config.yaml loads,
# with one warning per key and process (findistil has its own logging, and NMP and the LLM
# judge are not backends here yet).
UPSTREAM_UNUSED_KEYS = frozenset({"nmp_config", "llm_judge_config", "logging_config"})
_WARNED_KEYS: set[str] = set()

_YAML_DATA: ContextVar[dict[str, Any] | None] = ContextVar("findistil_yaml", default=None)


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field, field_name):  # pragma: no cover - unused by __call__
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_YAML_DATA.get() or {})


class Settings(BaseSettings):
    """All of findistil's settings. Build it with ``load_settings``."""

    model_config = SettingsConfigDict(
        env_prefix="FINDISTIL_", env_nested_delimiter="__", extra="ignore"
    )

    home: Path = Field(default_factory=lambda: Path("~/.findistil").expanduser())
    database_url: str | None = None
    artifact_root: Path | None = Field(
        None, description="where job artefacts live (default: home); shared when scaled out"
    )
    runner: Literal["threads", "celery"] = "threads"
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker")
    task_queue: str = Field("findistil", description="Celery queue of job and default tasks")
    max_parallel_jobs: int = Field(1, ge=1)
    max_parallel_candidates: int = Field(1, ge=1)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")
    lease_timeout_s: float = Field(
        60.0, ge=2, description="a running job/candidate whose owner is silent this long fails"
    )
    student_cache_size: int = Field(2, ge=1, description="students kept loaded per process")
    serve_max_batch: int = Field(
        16, ge=1, description="concurrent /v1 requests of one model answered in one batch"
    )
    serve_batch_window_ms: float = Field(
        4.0, ge=0, le=1000, description="how long a request waits for others to batch with"
    )
    max_record_bytes: int = Field(
        1 << 20, ge=1024, description="a longer log line or CSV row is rejected on load"
    )
    max_log_batch_records: int = Field(
        10_000, ge=1, description="records one POST /api/logs may carry"
    )
    max_log_batch_bytes: int = Field(
        32 << 20, ge=64 << 10, description="body size one POST /api/logs may have"
    )
    api_token: SecretStr | None = Field(
        None, description="an admin token (FINDISTIL_API_TOKEN); adds to api_tokens"
    )
    api_read_token: SecretStr | None = Field(
        None, description="a read-only token (FINDISTIL_API_READ_TOKEN)"
    )
    api_tokens: list[ApiToken] = Field(
        default_factory=list, description="bearer tokens: [{token, scope, name}] or strings"
    )
    api_threads: int = Field(
        2, ge=1, le=256, description="threads answering database routes (more: remote DB)"
    )
    trusted_hosts: list[str] = Field(
        default_factory=list, description="Host headers answered (empty: any)"
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="browser origins allowed cross-site (empty: none)"
    )
    redact_pii: bool = Field(
        False, description="replace e-mails, phones, cards, IBANs and SSNs on load"
    )
    recommendation_tolerance: float = Field(0.02, ge=0, description="macro-F1 gap accepted")

    nims: list[NimConfig] = Field(default_factory=_default_nims)
    data_split_config: DataSplitConfig = Field(default_factory=DataSplitConfig)
    training_config: TrainingConfig = Field(default_factory=TrainingConfig)
    lora_config: LoraConfig = Field(default_factory=LoraConfig)
    icl_config: ICLConfig = Field(default_factory=ICLConfig)
    evaluation_config: EvaluationConfig = Field(default_factory=EvaluationConfig)
    mlflow_config: MlflowConfig = Field(default_factory=MlflowConfig)
    cascade: CascadeConfig = Field(default_factory=CascadeConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _plain_tokens_are_admin(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"token": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("api_token", "api_read_token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("an API token needs at least 16 characters")
        return value

    def all_api_tokens(self) -> list[ApiToken]:
        """``api_tokens`` plus the env-var tokens, each with its scope."""
        extra = [
            ApiToken(token=secret, scope=scope, name=name)
            for secret, scope, name in (
                (self.api_token, "admin", "FINDISTIL_API_TOKEN"),
                (self.api_read_token, "read", "FINDISTIL_API_READ_TOKEN"),
            )
            if secret is not None
        ]
        return [*self.api_tokens, *extra]

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        return (init_settings, env_settings, _YamlSource(settings_cls))

    # -- paths: every artefact is rooted at ``home`` ------------------------------------
    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'findistil.db'}"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    @property
    def artifacts_root(self) -> Path:
        return Path(self.artifact_root).expanduser() if self.artifact_root else self.home

    @property
    def heartbeat_s(self) -> float:
        """How often a process renews its leases: several beats fit in one timeout."""
        return max(0.5, min(5.0, self.lease_timeout_s / 4))

    def training_for(self, nim: NimConfig) -> TrainingConfig:
        """The training config of one candidate: global values, then its own overrides."""
        return _merge(TrainingConfig, self.training_config, nim.training_config, "training_config")

    def lora_for(self, nim: NimConfig) -> LoraConfig:
        return _merge(LoraConfig, self.lora_config, nim.lora_config, "lora_config")

    def job_config(self, split_override: dict[str, Any] | None = None) -> JobConfig:
        """Everything a new job will run with, resolved now (``POST /api/jobs`` stores it)."""
        nims = []
        for nim in self.nims:
            data = nim.model_dump()
            data["training_config"] = self.training_for(nim)
            data["lora_config"] = self.lora_for(nim)
            nims.append(CandidateConfig.model_validate(data))
        return JobConfig(
            data_split_config=merge_split_config(
                self.data_split_config, split_override
            ).with_seed(),
            nims=nims,
            icl_config=self.icl_config,
            evaluation_config=self.evaluation_config,
            mlflow_config=self.mlflow_config,
            recommendation_tolerance=self.recommendation_tolerance,
            cascade=self.cascade,
        )


def _merge(model: type[BaseModel], base: BaseModel, override: dict | None, key: str):
    data = base.model_dump()
    data.update(override or {})
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, key)) from None


def merge_split_config(base: DataSplitConfig, override: dict[str, Any] | None) -> DataSplitConfig:
    """A job's ``data_split_config`` merged field by field over the configured one.

    Upstream replaced the whole section with class defaults; here only the fields the
    request names change. Example: ``merge_split_config(cfg, {"eval_size": 5})``.
    """
    return _merge(DataSplitConfig, base, override, "data_split_config")


def _describe(exc: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        key = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        parts.append(f"{key}: {err['msg']}{shown}")
    return "invalid configuration: " + "; ".join(parts)


def find_config_file(path: str | os.PathLike | None = None) -> Path | None:
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist: check the --config path")
        return p
    env = os.environ.get("FINDISTIL_CONFIG")
    if env:
        return find_config_file(env)
    local = Path("findistil.yaml")
    return local if local.is_file() else None


def load_settings(path: str | os.PathLike | None = None, **overrides: Any) -> Settings:
    """Resolve settings from defaults, YAML file, environment and keyword overrides.

    Raises:
        ConfigError: naming the first bad key, e.g. ``data_split_config.eval_size``.
    """
    data: dict[str, Any] = {}
    cfg = find_config_file(path)
    if cfg is not None:
        try:
            data = yaml.safe_load(cfg.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {cfg} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {cfg} must hold a mapping of keys at the top level")
    _warn_ignored_keys(data, cfg)
    token = _YAML_DATA.set(data)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    finally:
        _YAML_DATA.reset(token)
    settings.home = Path(settings.home).expanduser()
    return settings


def ignored_keys(data: dict[str, Any]) -> list[str]:
    """Top-level keys of a config mapping that no setting reads."""
    return sorted(str(k) for k in data if k not in Settings.model_fields)


def _warn_ignored_keys(data: dict[str, Any], path: Path | None) -> None:
    for key in ignored_keys(data):
        if key in _WARNED_KEYS:
            continue
        _WARNED_KEYS.add(key)
        why = (
            "an upstream key findistil does not use"
            if key in UPSTREAM_UNUSED_KEYS
            else "not a findistil setting: check its spelling"
        )
        log.warning("config file %s: top-level key %r ignored (%s)", path, key, why)
