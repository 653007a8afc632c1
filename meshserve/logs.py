"""Process logging: human-readable by default, JSON lines with `--log-format json`; every
line written while a call is served names its request id and, when it is traced, its
trace id (from the edge's call context). Prompts and outputs are never logged unless the
operator asks for it (`--log-prompts`, a debugging aid; see `prompt_logging`)."""

from __future__ import annotations

import logging
import sys

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

from meshserve.edge import current_call

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(call)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"

_log_prompts = False


class CallContextFilter(logging.Filter):
    """Adds `request_id` and `trace_id` (and, for the text format, `call`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        call = current_call.get()
        rid = call.request_id if call is not None else ""
        span = trace.get_current_span().get_span_context()
        tid = f"{span.trace_id:032x}" if span.is_valid else ""
        record.request_id = rid
        record.trace_id = tid
        parts = [f"request_id={rid}"] if rid else []
        if tid:
            parts.append(f"trace_id={tid}")
        record.call = f" [{' '.join(parts)}]" if parts else ""
        return True


class _Json(JsonFormatter):
    def add_fields(
        self,
        log_record: dict[str, object],
        record: logging.LogRecord,
        message_dict: dict[str, object],
    ) -> None:
        super().add_fields(log_record, record, message_dict)
        log_record.pop("call", None)  # the text format's suffix
        for key in ("request_id", "trace_id"):
            if not log_record.get(key):
                log_record.pop(key, None)


def setup(level: str = "info", fmt: str = "text", *, log_prompts: bool = False) -> None:
    """Configure the root logger of a meshserve process (stderr)."""
    set_prompt_logging(log_prompts)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(CallContextFilter())
    if fmt == "json":
        handler.setFormatter(
            _Json(JSON_FIELDS, rename_fields={"levelname": "level", "asctime": "time"})
        )
    elif fmt == "text":
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    else:
        raise ValueError(f"unknown log format {fmt!r}: use text or json")
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def set_prompt_logging(on: bool) -> None:
    global _log_prompts
    _log_prompts = on


def prompt_logging() -> bool:
    """Whether the operator asked for prompts and outputs in the log (debugging only)."""
    return _log_prompts
