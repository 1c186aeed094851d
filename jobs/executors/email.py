"""email_notification: send an email through Django's mail framework (so any EMAIL_BACKEND works).

Two things bound a run. Templates use an allow-list of Django's tags and filters (checked when
the job is saved), and their rendering stops at a size and a time. On Django's SMTP backend the
whole conversation ends by the run's deadline, and a failure says whether the server may have
taken the message: before it had all of it nothing was delivered (an ordinary, retryable
failure); after, until it answers, the mail may have gone out (OutcomeUnknown, or RunTimedOut
when the run's time ran out), and a type not safe to repeat is not retried.
"""

from __future__ import annotations

import functools
import io
import re
import smtplib
import socket
import time
import zoneinfo
from collections.abc import Callable
from contextvars import ContextVar
from functools import cache
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.core.mail.backends.smtp import EmailBackend as SMTPEmailBackend
from django.core.mail.utils import DNS_NAME
from django.core.validators import validate_email
from django.template import (
    Context,
    Engine,
    Library,
    Node,
    NodeList,
    TemplateSyntaxError,
    defaultfilters,
    defaulttags,
    loader_tags,
)
from django.utils import timezone
from django.utils.html import strip_tags
from django.utils.module_loading import import_string
from rest_framework import serializers

from .base import Executor, ExecutorError, OutcomeUnknown, RunTimedOut, seconds_left

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer
    from django.template.base import Parser, Token

    from jobs.models import JobRun

# "Name <address>"; the name may not hold quotes, angle brackets or backslashes, so it can
# always be written back as one quoted string.
_NAMED_ADDRESS = re.compile(r'^(?P<name>[^<>"\\]*)<(?P<address>[^<>]*)>$')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What rendered text may not put in a header: C0 and C1 control characters, line separators.
_NOT_IN_HEADERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# "Subject: " and the subject fit one header line of 998 characters (RFC 5322), even when the
# subject is one long word that cannot be folded.
SUBJECT_MAX_CHARS = 989

# -- templates ---------------------------------------------------------------------------------

# Tags and filters that read no files, reach no code or data beyond the context, and whose
# output grows at most with their input (loops and filters are metered below). Left out: include,
# extends, block, load, debug, url, csrf_token, querystring (files, code, the request); lorem,
# center, ljust, rjust, stringformat, floatformat (output as large as an argument says); join,
# make_list, addslashes (output that multiplies); pprint, dictsort, regroup, random, urlize and
# the *_html truncations (object internals, lookups, no use in a mail, or a history of slow
# inputs); escapejs, json_script, safeseq, escapeseq, unordered_list, linenumbers,
# phone2numeric (no use in a mail).
ALLOWED_TAGS = (
    "autoescape",
    "comment",
    "cycle",
    "filter",
    "firstof",
    "for",
    "if",
    "ifchanged",
    "now",
    "resetcycle",
    "spaceless",
    "templatetag",
    "verbatim",
    "widthratio",
    "with",
)
ALLOWED_FILTERS = (
    "add",
    "capfirst",
    "cut",
    "date",
    "default",
    "default_if_none",
    "divisibleby",
    "escape",
    "filesizeformat",
    "first",
    "force_escape",
    "get_digit",
    "iriencode",
    "last",
    "length",
    "linebreaks",
    "linebreaksbr",
    "lower",
    "pluralize",
    "safe",
    "slice",
    "slugify",
    "striptags",
    "time",
    "timesince",
    "timeuntil",
    "title",
    "truncatechars",
    "truncatewords",
    "upper",
    "urlencode",
    "wordcount",
    "wordwrap",
    "yesno",
)
# Per part (subject, body, HTML body): characters written, and passes through loop bodies (a
# pass is cheap, but millions of them, writing little or nothing, still take seconds).
MAX_RENDERED_CHARS = 1_000_000
MAX_LOOP_PASSES = 100_000
# For all the parts of one mail; real templates take milliseconds.
MAX_RENDER_SECONDS = 2.0


class RenderLimitExceeded(ExecutorError):
    """A template grew past its size cap, looped too often or ran past its time while rendering."""


class _RenderBudget:
    """The characters, loop passes and time one part's rendering may use."""

    def __init__(self, *, part: str, deadline: float, max_chars: int, max_passes: int) -> None:
        self.part = part
        self.deadline = deadline
        self.max_chars = max_chars
        self.max_passes = max_passes
        self.seconds = max(deadline - time.monotonic(), 0.0)
        self.chars = 0  # written so far by finished loop passes
        self.passes = 0

    def begin_pass(self) -> None:
        """Count one pass through a loop body; stop the render past the passes or the time allowed."""
        self.passes += 1
        if self.passes > self.max_passes:
            raise RenderLimitExceeded(f"the loops of the {self.part} ran more than {self.max_passes:,} times")
        self.check(0)

    def end_pass(self, chars: int) -> None:
        """Record `chars` written so far; stop the render when that is too much."""
        self.check(chars)
        self.chars = chars

    def check(self, size: int) -> None:
        """Stop the render when `size` characters are too many, or its time is up."""
        if size > self.max_chars:
            raise RenderLimitExceeded(f"the rendered {self.part} is larger than {self.max_chars:,} characters")
        if time.monotonic() > self.deadline:
            raise RenderLimitExceeded(f"rendering the {self.part} took longer than {self.seconds:.1f}s")


# The budget of the render in progress on this thread (filters get no template context).
_BUDGET: ContextVar[_RenderBudget | None] = ContextVar("email_render_budget", default=None)


class _MeteredLoopBody(Node):
    """The body of a {% for %} loop, each pass counted against the render's budget.

    Loops are where output multiplies (three nested loops over a 300-character string write
    27 million characters), so each pass counts, and checks the size written and the time.
    """

    def __init__(self, nodelist: NodeList) -> None:
        self.nodelist = nodelist

    def render(self, context: Context) -> str:
        budget = _BUDGET.get()
        if budget is None:
            return self.nodelist.render(context)
        budget.begin_pass()
        before = budget.chars
        output = self.nodelist.render(context)
        # This pass's output holds what the loops inside it wrote: count it once.
        budget.end_pass(before + len(output))
        return output


def _metered_for(parser: Parser, token: Token) -> Node:
    node = defaulttags.do_for(parser, token)
    assert isinstance(node.nodelist_loop, NodeList)  # the parser's; the stubs also allow a list
    node.nodelist_loop = NodeList([_MeteredLoopBody(node.nodelist_loop)])
    return node


def _metered_filter(function: Callable[..., Any]) -> Callable[..., Any]:
    """Return the filter `function`, refusing a result larger than the render may write.

    A filter's result can feed the next one ({% with a=a|add:a %} doubles at each level), so
    it is checked where it is made, not only where it is written.
    """

    # wraps() keeps the flags the template engine reads (is_safe, needs_autoescape,
    # expects_localtime) and, through __wrapped__, the signature it checks arguments against.
    @functools.wraps(function)
    def metered(*args: Any, **kwargs: Any) -> Any:
        result = function(*args, **kwargs)
        budget = _BUDGET.get()
        if budget is not None:
            budget.check(len(result) if isinstance(result, str | list | tuple) else 0)
        return result

    return metered


def _refused_tag(name: str) -> Callable[[Parser, Token], Node]:
    def refuse(parser: Parser, token: Token) -> Node:
        raise TemplateSyntaxError(
            f"{{% {name} %}} is not allowed in mail templates; allowed tags: {', '.join(ALLOWED_TAGS)}"
        )

    return refuse


def _library() -> Library:
    """Return the only tags and filters mail templates know: the allow-lists, metered."""
    library = Library()
    for name in ALLOWED_TAGS:
        library.tag(name, _metered_for if name == "for" else defaulttags.register.tags[name])
    # Django's other tags get a message that says why, rather than "did you forget to load it?".
    for name in sorted((defaulttags.register.tags.keys() | loader_tags.register.tags.keys()) - set(ALLOWED_TAGS)):
        library.tag(name, _refused_tag(name))
    for name in ALLOWED_FILTERS:
        library.filter(name, _metered_filter(defaultfilters.register.filters[name]))
    return library


# The mail engine's one built-in library (Engine(builtins=[...]) imports it from this module).
register = _library()


class _MailEngine(Engine):
    # Engine always loads Django's built-in tags and filters first; mail templates get none of
    # them beyond `register`, so a tag or filter not allowed is unknown when the template is parsed.
    default_builtins: list[str] = []


@cache
def template_engine(*, autoescape: bool) -> Engine:
    """Return the engine for mail templates: the allow-listed tags and filters, no template files."""
    return _MailEngine(dirs=[], app_dirs=False, libraries={}, builtins=[__name__], autoescape=autoescape)


def _explain(exc: TemplateSyntaxError) -> str:
    """Return the parser's message, with what is allowed when it names an unknown tag or filter."""
    message = str(exc).replace(" Did you forget to register or load this tag?", "")
    if message.startswith("Invalid block tag"):
        return f"{message} (allowed tags: {', '.join(ALLOWED_TAGS)})"
    if message.startswith("Invalid filter"):
        return f"{message}; allowed filters: {', '.join(ALLOWED_FILTERS)}"
    return message


def render(
    source: str,
    context: dict[str, Any],
    *,
    part: str,
    deadline: float,
    html: bool = False,
    max_chars: int = MAX_RENDERED_CHARS,
    max_passes: int = MAX_LOOP_PASSES,
) -> str:
    """Render one part of a mail; raise RenderLimitExceeded past a limit or `deadline` (time.monotonic())."""
    budget = _RenderBudget(part=part, deadline=deadline, max_chars=max_chars, max_passes=max_passes)
    current = _BUDGET.set(budget)
    try:
        output = template_engine(autoescape=html).from_string(source).render(Context(context, autoescape=html))
    finally:
        _BUDGET.reset(current)
    budget.check(len(output))
    return output


def _no_line_breaks(value: str) -> None:
    if "\n" in value or "\r" in value:
        raise serializers.ValidationError("must not contain line breaks (header injection)")
    if _CONTROL.search(value):
        raise serializers.ValidationError("must not contain control characters")


def _template(value: str) -> None:
    try:
        template_engine(autoescape=False).from_string(value)
    except TemplateSyntaxError as exc:
        raise serializers.ValidationError(f"template error: {_explain(exc)}") from exc
    except RecursionError as exc:
        raise serializers.ValidationError("template error: tags are nested too deeply") from exc


def clean_address(value: Any) -> str:
    """Return `value` as one safe address ("a@example.com" or '"Name" <a@example.com>')."""
    if not isinstance(value, str):
        raise serializers.ValidationError("must be an email address")
    _no_line_breaks(value)
    value = value.strip()
    match = _NAMED_ADDRESS.fullmatch(value)
    name, address = (match["name"].strip(), match["address"].strip()) if match else ("", value)
    try:
        validate_email(address)
    except DjangoValidationError as exc:
        raise serializers.ValidationError("Enter a valid email address.") from exc
    return f'"{name}" <{address}>' if name else address


class AddressField(serializers.Field):
    """One email address, optionally with a display name."""

    def to_internal_value(self, data: Any) -> str:
        return clean_address(data)

    def to_representation(self, value: str) -> str:
        return value


class AddressListField(serializers.ListField):
    """One email address or a list of them; always a list once validated."""

    child = serializers.EmailField()  # for the JSON Schema; the addresses are checked by clean_address

    def to_internal_value(self, data: Any) -> list[str]:
        if isinstance(data, str):
            data = [data]
        if not isinstance(data, list):
            raise serializers.ValidationError("must be an email address or a list of them")
        if self.min_length is not None and len(data) < self.min_length:
            raise serializers.ValidationError(f"needs at least {self.min_length} address")
        if self.max_length is not None and len(data) > self.max_length:
            raise serializers.ValidationError(f"at most {self.max_length} addresses")
        errors: dict[int, list[str]] = {}
        addresses = []
        for index, item in enumerate(data):
            try:
                addresses.append(clean_address(item))
            except serializers.ValidationError as exc:
                errors[index] = [str(detail) for detail in exc.detail]
        if errors:
            # Keyed by list index, as DRF's own ListField does; the stubs only allow str keys.
            raise serializers.ValidationError(errors)  # type: ignore[arg-type]
        return addresses


def _body_field(*, max_length: int, help_text: str) -> serializers.CharField:
    """Return an optional body template field, kept exactly as written (no trimming)."""
    return serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        trim_whitespace=False,
        max_length=max_length,
        validators=[_template],
        help_text=help_text,
    )


class EmailParameters(serializers.Serializer):
    recipient = AddressListField(
        min_length=1, max_length=100, help_text='One address or a list; "Name <a@example.com>" works too.'
    )
    subject = serializers.CharField(
        max_length=998,
        validators=[_no_line_breaks, _template],
        help_text="One line; Django template syntax, e.g. \"{{ job.name }} for {{ run.scheduled_for|date:'Y-m-d' }}\".",
    )
    body = _body_field(
        max_length=100_000, help_text="Plain-text body; Django template syntax with {{ job.* }} and {{ run.* }}."
    )
    html_body = _body_field(
        max_length=500_000,
        help_text="Optional HTML alternative (variables are HTML-escaped). The plain body defaults to its text.",
    )
    cc = AddressListField(required=False, default=list, max_length=100)
    bcc = AddressListField(required=False, default=list, max_length=100, help_text="Delivered, but not in headers.")
    reply_to = AddressListField(required=False, default=list, max_length=10)
    from_email = AddressField(required=False, default="", help_text="Defaults to DEFAULT_FROM_EMAIL.")


def template_context(run: JobRun) -> dict[str, Any]:
    """Return the variables templates see: plain copies of the job's and run's fields, no ORM access."""
    job = run.job
    return {
        "job": {
            "id": job.pk,
            "name": job.name,
            "description": job.description,
            "cron_expression": job.cron_expression,
            "timezone": job.timezone,
            "job_type": job.job_type,
            "next_run_at": job.next_run_at,
            "last_run_at": job.last_run_at,
            "last_run_status": job.last_run_status,
        },
        "run": {
            "id": run.pk,
            "scheduled_for": run.scheduled_for,
            "trigger": run.trigger,
            "attempt": run.attempt,
            "not_before": run.not_before,
            "started_at": run.started_at,
            "missed_fires": run.missed_fires,
        },
    }


# -- sending -----------------------------------------------------------------------------------

# Work that delivers nothing (rendering, connecting, the commands before the message) ends this
# long before the run's deadline, at most a quarter of the job's timeout. A failure then is
# recorded as what it is, an ordinary failure that may be retried, before the scheduler's own
# clock stops the run as timed out (which, for a type not safe to repeat, is never retried).
SEND_RESERVE_SECONDS = 1.0
# Once the message is answered, the goodbye (QUIT) waits at most this long.
QUIT_SECONDS = 1.0


class _Conversation:
    """How far one SMTP conversation got, and the time each of its waits may take.

    Nothing is delivered until the server has the whole message (the end of the DATA content);
    from then until it answers, the mail may have been delivered or not.
    """

    def __init__(self, *, deadline: float, commands_deadline: float, per_operation: float | None) -> None:
        self.deadline = deadline  # time.monotonic() of the run's deadline
        self.commands_deadline = commands_deadline  # ...for everything before the message's content
        self.per_operation = per_operation  # EMAIL_TIMEOUT
        self.data_accepted = False  # the server answered DATA with 354: the content follows
        self.message_sent = False  # the whole content, up to its final ".", was written
        self.answered = False  # ...and the server answered it (250: delivered; else: refused)

    @property
    def outcome_unknown(self) -> bool:
        return self.message_sent and not self.answered

    def timeout(self) -> float:
        """Return the timeout of the next connect, read or write; raise TimeoutError when no time is left."""
        left = (self.deadline if self.data_accepted else self.commands_deadline) - time.monotonic()
        if left <= 0:
            raise TimeoutError("the job's time ran out")
        if self.answered:
            # The message was answered: QUIT gets a moment, not the rest of the run (a server
            # stalling on it must not turn a delivered mail into a timed-out run).
            left = min(left, QUIT_SECONDS)
        return left if self.per_operation is None else min(left, self.per_operation)


class _DeadlineReads(io.RawIOBase):
    """A socket's reads, each waiting at most the time left (a trickle cannot outlast the deadline)."""

    def __init__(self, sock: socket.socket, timeout: Callable[[], float]) -> None:
        super().__init__()
        self._sock = sock
        self._timeout = timeout

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        self._sock.settimeout(self._timeout())
        return self._sock.recv_into(buffer)


class _DeadlineSMTP(smtplib.SMTP):
    """smtplib.SMTP whose every connect, write and read waits at most what its conversation has left.

    A socket timeout alone bounds each wait, not their sum: a server answering every command
    just in time would stretch a run far past its deadline. So the timeout is set again before
    each write and each read, to the time left.
    """

    def __init__(self, *args: Any, conversation: _Conversation, **kwargs: Any) -> None:
        self.conversation = conversation
        self._command = ""  # the last command sent
        super().__init__(*args, **kwargs)  # connects

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        # Connecting, and the TLS handshake of SMTP_SSL, get the time left.
        sock: socket.socket = super()._get_socket(host, port, self.conversation.timeout())  # type: ignore[misc]
        return sock

    def putcmd(self, cmd: str, args: str = "") -> None:
        self._command = cmd.lower()
        super().putcmd(cmd, args)

    def send(self, s: ReadableBuffer | str) -> None:
        if self.sock is not None:
            try:
                self.sock.settimeout(self.conversation.timeout())  # sendall() is bounded by it as a whole
            except TimeoutError as exc:
                self.close()
                raise smtplib.SMTPServerDisconnected(f"not sent: {exc}") from exc
        super().send(s)
        if self._command == "data" and self.conversation.data_accepted:
            self.conversation.message_sent = True

    def getreply(self) -> tuple[int, bytes]:
        if self.file is None and self.sock is not None:
            # Where smtplib would use sock.makefile(); a timeout raised here is an OSError, which
            # smtplib turns into SMTPServerDisconnected after closing the connection.
            self.file = io.BufferedReader(_DeadlineReads(self.sock, self.conversation.timeout))
        code, text = super().getreply()
        if self._command == "data":
            if self.conversation.message_sent:
                self.conversation.answered = True
            elif code == 354:
                self.conversation.data_accepted = True
        return code, text


class _DeadlineSMTPSSL(_DeadlineSMTP, smtplib.SMTP_SSL):
    """_DeadlineSMTP over SSL (EMAIL_USE_SSL)."""


class _DeadlineEmailBackend(SMTPEmailBackend):
    """Django's SMTP backend (settings, STARTTLS, login, message encoding) on a _DeadlineSMTP connection."""

    def __init__(self, conversation: _Conversation, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conversation = conversation

    @property
    def connection_class(self) -> Callable[..., smtplib.SMTP]:
        smtp = _DeadlineSMTPSSL if self.use_ssl else _DeadlineSMTP
        return functools.partial(smtp, conversation=self.conversation)


def _describe(exc: BaseException) -> str:
    """Say what went wrong in an SMTP exchange, in one line."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        refused = "; ".join(
            f"{address}: {code} {reply.decode(errors='replace')}" for address, (code, reply) in exc.recipients.items()
        )
        return f"it refused every recipient ({refused})"
    if isinstance(exc, smtplib.SMTPResponseException):
        reply = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) else exc.smtp_error
        return f"it answered {exc.smtp_code} {reply}"
    return f"{type(exc).__name__}: {exc}"


def send_by_smtp(message: EmailMessage, *, run: JobRun, deadline: float, commands_deadline: float) -> int:
    """Send `message` with Django's SMTP backend within the run's deadline; return the number sent.

    Raise ExecutorError when nothing was delivered, OutcomeUnknown (RunTimedOut when the run's
    time ran out) when the server had the whole message and did not answer.
    """
    conversation = _Conversation(
        deadline=deadline, commands_deadline=commands_deadline, per_operation=settings.EMAIL_TIMEOUT
    )
    backend = _DeadlineEmailBackend(conversation, fail_silently=False)
    server = f"{backend.host}:{backend.port}"
    try:
        return backend.send_messages([message])
    except (smtplib.SMTPException, OSError) as exc:
        timeout = run.job.timeout_seconds
        if conversation.outcome_unknown:
            if time.monotonic() >= deadline:
                raise RunTimedOut(
                    f"{server} did not answer the message within the job's timeout of {timeout}s; "
                    "it may have been delivered"
                ) from exc
            raise OutcomeUnknown(
                f"{server} did not answer the message ({_describe(exc)}); it may have been delivered"
            ) from exc
        within = f" within the job's timeout of {timeout}s" if time.monotonic() >= commands_deadline else ""
        raise ExecutorError(
            f"could not send through {server}{within} ({_describe(exc)}); nothing was delivered"
        ) from exc


class EmailNotificationExecutor(Executor):
    name = "email_notification"
    label = "Email notification"
    description = "Send an email (plain text, optional HTML) through Django's configured mail backend."
    parameters_serializer = EmailParameters
    safe_to_repeat = False  # a repeat after a crash could send the mail twice
    parameters_example = {
        "recipient": ["ops@example.com"],
        "subject": "{{ job.name }} for {{ run.scheduled_for|date:'Y-m-d' }}",
        "body": "Hello,\n\nthe report is ready.\n\n-- {{ job.name }} (run {{ run.id }})",
    }

    def execute(self, run: JobRun) -> dict[str, Any]:
        params = self.parameters_for(run)
        context = template_context(run)
        deadline = time.monotonic() + seconds_left(run)
        commands_deadline = deadline - min(SEND_RESERVE_SECONDS, run.job.timeout_seconds / 4)
        render_deadline = min(time.monotonic() + MAX_RENDER_SECONDS, commands_deadline)
        # Dates in templates read in the job's own time zone, as its schedule does.
        try:
            zone = zoneinfo.ZoneInfo(run.job.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            zone = timezone.get_default_timezone()
        with timezone.override(zone):
            subject = render(params["subject"], context, part="subject", deadline=render_deadline)
            html = ""
            if params["html_body"]:
                html = render(params["html_body"], context, part="html body", deadline=render_deadline, html=True)
            if params["body"]:
                body = render(params["body"], context, part="body", deadline=render_deadline)
            else:
                body = strip_tags(html).strip()
        # Job fields in the subject must not break its header: control characters and line
        # breaks become spaces, and one long word still fits a header line.
        subject = " ".join(_NOT_IN_HEADERS.sub(" ", subject).split())[:SUBJECT_MAX_CHARS]
        message_id = f"<job{run.job_id}.run{run.pk}.{run.attempt}.{timezone.now():%Y%m%d%H%M%S%f}@{DNS_NAME}>"
        message = EmailMultiAlternatives(
            subject=subject,
            body=body,
            from_email=params["from_email"] or settings.DEFAULT_FROM_EMAIL,
            to=params["recipient"],
            cc=params["cc"],
            bcc=params["bcc"],
            reply_to=params["reply_to"],
            headers={"Message-ID": message_id, "X-Scheduler-Job": str(run.job_id), "X-Scheduler-Run": str(run.pk)},
        )
        if html:
            message.attach_alternative(html, "text/html")
        backend = import_string(settings.EMAIL_BACKEND)
        if backend is SMTPEmailBackend:
            sent = send_by_smtp(message, run=run, deadline=deadline, commands_deadline=commands_deadline)
        elif isinstance(backend, type) and issubclass(backend, SMTPEmailBackend):
            # A customised SMTP backend: each wait, at least, is bounded by the time left.
            per_operation = min(settings.EMAIL_TIMEOUT or float("inf"), seconds_left(run))
            sent = backend(fail_silently=False, timeout=per_operation).send_messages([message])
        else:
            sent = message.send(fail_silently=False)  # console, locmem, file, an API's backend
        return {
            "sent": sent,
            "message_id": message_id,
            "to": params["recipient"],
            "cc": params["cc"],
            "bcc_count": len(params["bcc"]),
            "subject": subject,
        }
