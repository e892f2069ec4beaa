"""Chat templates: transformers' Jinja dialect, rendered in a separate process under limits.

A model directory carries its chat template in ``chat_template.jinja`` or in the
``chat_template`` entry of ``tokenizer_config.json`` (a string, or a list of
``{"name", "template"}`` of which ``"default"`` is used); the ``.jinja`` file wins, as in
transformers. Templates are written against transformers' environment, which this module
reproduces: ``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with
``jinja2.ext.loopcontrols`` (``{% break %}``, ``{% continue %}``), the ``{% generation %}``
block tag (transformers uses it for its assistant-token mask; here it only renders its body),
a ``tojson`` filter that keeps non-ASCII text and takes ``indent``/``separators``/``sort_keys``
(Jinja's own escapes HTML), and the globals ``raise_exception(msg)`` and ``strftime_now(fmt)``.

Why a process. The sandbox stops a template from reaching Python internals, but not from
looping for hours (nested loops: ``range`` is capped at 100 000 per call, not per template) or
from doubling a string forty times. A thread cannot be stopped, and a trace hook in this
process sees neither the C code of one huge allocation nor its memory. So each render runs in
a fresh interpreter running this file (stdlib and jinja2 only, about 0.1 s to start): the
address space is capped with ``RLIMIT_AS``, CPU time with ``RLIMIT_CPU``, the output is counted
while it streams out of ``Template.generate``, and the parent kills the process at the wall-clock
limit. Every failure comes back as one line naming the template file. The arguments travel as
JSON, which is what chat messages, tools and template flags are.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

if __name__ != "__main__":  # this file is also the render worker, which needs only jinja2
    from dsv3_jax.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class RenderLimits:
    """Bounds on one render call: wall-clock seconds (worker start included), characters of
    output per conversation, and the worker's address space."""
    seconds: float = 10.0
    chars: int = 4_000_000
    memory_mib: int = 1024


def read_chat_template(config: dict, config_file: pathlib.Path) -> tuple[str | None, str]:
    """(template or None, name for messages) from ``chat_template.jinja`` or tokenizer_config.json."""
    jinja_file = config_file.parent / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{jinja_file}: cannot read the chat template: {e}") from None
    value, name = config.get("chat_template"), f"{config_file}[chat_template]"
    if value is None or isinstance(value, str):
        return value, name
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        named = {t["name"]: t["template"] for t in value}
        if "default" in named:
            return named["default"], f"{config_file}[chat_template default]"
        raise DataError(f"{config_file}: chat_template has no template named 'default' "
                        f"(it has {sorted(named)})")
    raise DataError(f"{config_file}: chat_template must be a string or a list of "
                    f"{{\"name\", \"template\"}} objects, got {type(value).__name__}")


def render(template: str, contexts: list[dict], *, name: str,
           limits: RenderLimits = RenderLimits()) -> list[str]:
    """Renders ``template`` once per context (the template's variables) in one worker process."""
    try:
        request = json.dumps({"template": template, "contexts": contexts, "chars": limits.chars,
                              "seconds": limits.seconds, "memory_mib": limits.memory_mib})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"chat template arguments must be JSON values: {e}") from None
    # -P keeps this file's folder (the package) off the worker's path; PYTHONPATH gives it the
    # parent's, so that it finds the same jinja2.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    try:
        proc = subprocess.run([sys.executable, "-P", __file__], input=request.encode(), env=env,
                              capture_output=True, timeout=limits.seconds)
    except subprocess.TimeoutExpired:
        _fail(name, "timeout", f"still rendering after {limits.seconds:g} s, stopped "
                               f"(a runaway loop?)")
    try:
        reply = json.loads(proc.stdout)
    except ValueError:
        reply = {"kind": "worker", "message": f"render worker exited with status {proc.returncode}: "
                 f"{_last_line(proc.stderr.decode(errors='replace'))}"}
    if "outputs" not in reply:
        _fail(name, reply["kind"], reply["message"], reply.get("line"), limits)
    return reply["outputs"]


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message (killed by its CPU limit?)"


def _fail(name: str, kind: str, message: str, line: int | None = None,
          limits: RenderLimits = RenderLimits()):
    message = " ".join(str(message).split())  # one line, whatever the template wrote
    if len(message) > 500:
        message = message[:500] + "..."
    where = f"{name}, line {line}" if line else name
    if kind == "raised":  # the template refused its input: the conversation or template flags
        raise ConfigError(f"{where}: the chat template rejected the conversation: {message}")
    what = {"syntax": "syntax error: ", "size": f"rendered more than {limits.chars} characters, stopped",
            "memory": f"needed more than {limits.memory_mib} MiB, stopped", "error": "error: "}
    raise DataError(f"{where}: chat template {what.get(kind, '')}{message}")


# ---- the worker (`python -P chat_template.py`: the request on stdin, the reply on stdout) -----------
class _TemplateRaised(Exception):
    """``raise_exception(msg)`` from a template."""


class _TooLong(Exception):
    pass


def _environment():
    """transformers' chat-template environment (see the module docstring)."""
    import datetime

    import jinja2.ext
    import jinja2.sandbox

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def raise_exception(message):
        raise _TemplateRaised(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


def _template_line(tb) -> int | None:
    """The template line of a render error: jinja2 rewrites tracebacks onto '<template>' frames."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _render_request(request: dict) -> dict:
    import jinja2

    try:
        template = _environment().from_string(request["template"])
        outputs = []
        for context in request["contexts"]:
            parts, n = [], 0
            for piece in template.generate(context):
                n += len(piece)
                if n > request["chars"]:
                    raise _TooLong()
                parts.append(piece)
            outputs.append("".join(parts))
        return {"outputs": outputs}
    except jinja2.TemplateSyntaxError as e:
        return {"kind": "syntax", "message": e.message or str(e), "line": e.lineno}
    except _TemplateRaised as e:
        return {"kind": "raised", "message": str(e), "line": _template_line(e.__traceback__)}
    except _TooLong:
        return {"kind": "size", "message": ""}
    except MemoryError:
        return {"kind": "memory", "message": ""}
    except Exception as e:  # the template's own error: undefined name, wrong type, sandbox refusal
        return {"kind": "error", "message": f"{type(e).__name__}: {e}",
                "line": _template_line(e.__traceback__)}


def _serve() -> None:
    request = json.loads(sys.stdin.buffer.read())
    try:
        import resource
    except ImportError:  # Windows: only the parent's wall-clock limit and the output count apply
        resource = None
    for name, value in (("RLIMIT_AS", request["memory_mib"] * 2**20),
                        ("RLIMIT_CPU", int(request["seconds"]) + 2)):
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (AttributeError, ValueError, OSError):  # no such limit, or a lower hard limit
            pass
    reply = _render_request(request)
    sys.stdout.write(json.dumps(reply))


if __name__ == "__main__":
    _serve()
