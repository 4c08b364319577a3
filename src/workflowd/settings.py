"""Daemon settings: command-line flags > ``WORKFLOWD_*`` env > config file > defaults."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workflowd import envref, loader, model
from workflowd.errors import ConfigError
from workflowd.yamlsrc import load_documents

DEFAULT_CONFIG = Path("/etc/workflowd/workflowd.yaml")

NotificationAction = Annotated[model.SlackAction | model.WebhookAction, Field(discriminator="type")]


class Notifications(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    circuit_breaker: NotificationAction | None = None


class ConfigFile(BaseModel):
    """The config file's keys (SPEC §1)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    workflows_dir: str | None = None
    database: str | None = None
    broker_url: str | None = None
    result_backend: str | None = None
    default_queue: str | None = Field(default=None, min_length=1)
    worker_timeout_seconds: float | None = Field(default=None, gt=0)
    reload_interval_seconds: float | None = Field(default=None, gt=0)
    history_retention_days: float | None = Field(default=None, gt=0)
    metrics_address: str | None = None
    notifications: Notifications = Field(default_factory=Notifications)


@dataclass(frozen=True)
class Settings:
    workflows_dir: Path = Path("./workflows")
    database: Path = Path("./workflowd.db")
    broker_url: str = "redis://localhost:6379/0"
    result_backend: str | None = None
    default_queue: str = "celery"
    worker_timeout_seconds: float = 30.0
    reload_interval_seconds: float = 2.0
    history_retention_days: float = 30.0
    metrics_address: str | None = None
    circuit_breaker_notification: model.SlackAction | model.WebhookAction | None = None
    config_file: Path | None = None
    secrets: dict[str, str] = field(default_factory=dict)

    def redactor(self) -> envref.Redactor:
        return envref.Redactor(self.secrets)


_ENV: dict[str, tuple[str, ...]] = {
    "workflows_dir": ("WORKFLOWD_WORKFLOWS_DIR",),
    "database": ("WORKFLOWD_DATABASE",),
    "broker_url": ("WORKFLOWD_BROKER_URL", "CELERY_BROKER_URL"),
    "result_backend": ("WORKFLOWD_RESULT_BACKEND", "CELERY_RESULT_BACKEND"),
    "default_queue": ("WORKFLOWD_DEFAULT_QUEUE",),
    "metrics_address": ("WORKFLOWD_METRICS_ADDRESS",),
}


def read_config_file(path: Path, env: Mapping[str, str]) -> tuple[ConfigFile, dict[str, str]]:
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read config file: {exc.strerror}") from None
    docs, issues = load_documents(text, name)
    if issues:
        raise ConfigError("\n".join(str(i) for i in issues))
    if not docs or docs[0].data is None:
        return ConfigFile(), {}
    doc = docs[0]
    if len(docs) > 1 or not isinstance(doc.data, dict):
        raise ConfigError(
            f"{name}:{doc.start.line}:{doc.start.column}: the config file must be one YAML mapping"
        )
    problems: list[tuple[tuple[str | int, ...], str]] = []
    secrets: dict[str, str] = {}
    data = loader.expand_env(doc.data, (), env, secrets, problems)
    messages = [(p, m, False) for p, m in problems]
    cfg = ConfigFile()
    if not messages:
        try:
            cfg = ConfigFile.model_validate(data)
        except ValidationError as exc:
            for err in exc.errors():
                p = loader.data_path(tuple(err["loc"]), data)
                text = loader.error_message(err, p, data, _config_keys)
                messages.append((p, text, err["type"] == "extra_forbidden"))
    if messages:
        lines = []
        for p, m, at_key in messages:
            mark = doc.mark_for(p, key=at_key)
            lines.append(f"{name}:{mark.line}:{mark.column}: {loader.key_path(p)}: {m}")
        raise ConfigError("\n".join(lines))
    return cfg, secrets


def _config_keys(path: tuple[str | int, ...], data: Any) -> tuple[str, ...]:
    if not path:
        return tuple(ConfigFile.model_fields)
    if path == ("notifications",):
        return tuple(Notifications.model_fields)
    if path == ("notifications", "circuit_breaker") and isinstance(data, dict):
        kind = (data.get("notifications") or {}).get("circuit_breaker", {}).get("type")
        if kind in ("slack", "webhook"):
            return model.MODEL_KEYS[kind]
    return ()


def resolve(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Settings from flags (None = not given), environment, config file and defaults."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = os.environ if env is None else env
    config_path: Path | None = None
    if flags.get("config"):
        config_path = Path(flags["config"])
        if not config_path.exists():
            raise ConfigError(f"{config_path}: config file not found")
    elif env.get("WORKFLOWD_CONFIG"):
        config_path = Path(env["WORKFLOWD_CONFIG"])
        if not config_path.exists():
            raise ConfigError(f"{config_path}: config file (WORKFLOWD_CONFIG) not found")
    elif DEFAULT_CONFIG.exists():
        config_path = DEFAULT_CONFIG
    cfg, secrets = read_config_file(config_path, env) if config_path else (ConfigFile(), {})

    values: dict[str, Any] = {}
    for key in (
        "workflows_dir",
        "database",
        "broker_url",
        "result_backend",
        "default_queue",
        "worker_timeout_seconds",
        "reload_interval_seconds",
        "history_retention_days",
        "metrics_address",
    ):
        if key in flags:
            values[key] = flags[key]
            continue
        from_env = next((env[n] for n in _ENV.get(key, ()) if env.get(n)), None)
        if from_env is not None:
            values[key] = from_env
        elif getattr(cfg, key) is not None:
            values[key] = getattr(cfg, key)
    if "database" not in values and env.get("STATE_DIRECTORY"):
        # systemd may pass several directories separated by ':'; the first is ours.
        values["database"] = Path(env["STATE_DIRECTORY"].split(":")[0]) / "workflowd.db"
    for key in ("workflows_dir", "database"):
        if key in values:
            values[key] = Path(values[key])
    for key in ("worker_timeout_seconds", "reload_interval_seconds", "history_retention_days"):
        if key in values:
            values[key] = float(values[key])
    if (
        config_path is not None
        and "workflows_dir" in values
        and cfg.workflows_dir
        and ("workflows_dir" not in flags and not env.get("WORKFLOWD_WORKFLOWS_DIR"))
    ):
        # relative paths in the config file are relative to the file
        values["workflows_dir"] = config_path.parent / values["workflows_dir"]
    return Settings(
        **values,
        circuit_breaker_notification=cfg.notifications.circuit_breaker,
        config_file=config_path,
        secrets=secrets,
    )
