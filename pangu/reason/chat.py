"""The chat format of openPangu-Embedded: turns, reasoning markers and the fast / slow / auto mode switches.

Release template [C]: `[unused9]系统：{sys}[unused10][unused9]用户：{user}[unused10][unused9]助手：`, an empty
system turn when none is given, and the output `[unused16] reasoning [unused17] answer [unused10]`. Slow mode is
the default; appending " /no_think" to the user turn gives fast mode (an empty reasoning span) and " /auto_think"
adaptive mode. As in Qwen3 the flag is offered both as a suffix and as an API argument (`mode=`); with several
flags in one turn the last one wins.

Auto mode [U: the paper's meta-prompt strings are unknown; we use these]: the response opens with a mode tag
(`auto_fast_tag` or `auto_slow_tag`) and then follows that mode's format, so the model's own choice is visible.

`RELEASE_FORMAT` spells the release's markers; `COMPACT_FORMAT` uses one byte per marker, for byte-level toy
models where every marker byte is a training and decoding step.
"""

import dataclasses
import re

MODES = ("slow", "fast", "auto")
MODE_FLAGS = {"/think": "slow", "/no_think": "fast", "/auto_think": "auto"}


@dataclasses.dataclass(frozen=True)
class ChatFormat:
  """Marker strings of one chat template.

  Attributes:
    system_open: opens the system turn; None: the format has no system turn.
    user_open, assistant_open: open the user turn and the assistant's reply.
    turn_end: closes a turn; also the reply's stop marker (EOS).
    think_open, think_close: delimit the reasoning span.
    auto_fast_tag, auto_slow_tag: the mode the model chose in auto mode, emitted first.
  """

  system_open: str | None = "[unused9]系统："
  user_open: str = "[unused9]用户："
  assistant_open: str = "[unused9]助手："
  turn_end: str = "[unused10]"
  think_open: str = "[unused16]"
  think_close: str = "[unused17]"
  auto_fast_tag: str = "[fast]"
  auto_slow_tag: str = "[slow]"

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if value is not None and not value:
        raise ValueError(f"ChatFormat.{field.name} must not be empty")
    if self.auto_fast_tag == self.auto_slow_tag or self.think_open == self.think_close:
      raise ValueError("ChatFormat: the two auto tags and the two think markers must differ")


RELEASE_FORMAT = ChatFormat()
COMPACT_FORMAT = ChatFormat(system_open=None, user_open="Q:", assistant_open="|", turn_end="\n", think_open="<",
                            think_close=">", auto_fast_tag="F", auto_slow_tag="S")


@dataclasses.dataclass(frozen=True)
class Response:
  """A parsed reply. `mode` is "fast" when the reasoning span is empty, else "slow"; `chosen` is the auto tag's
  mode (None outside auto mode); `complete` is False when a marker is missing (truncated or malformed)."""

  mode: str
  chosen: str | None
  reasoning: str
  answer: str
  complete: bool


def split_mode(user: str, default: str = "slow") -> tuple[str, str]:
  """(user text without mode flags, mode): the last " /think", " /no_think" or " /auto_think" wins."""
  pattern = r"\s*(" + "|".join(re.escape(f) for f in sorted(MODE_FLAGS, key=len, reverse=True)) + r")(?=\s|$)"
  flags = re.findall(pattern, user)
  return re.sub(pattern, "", user).rstrip(), MODE_FLAGS[flags[-1]] if flags else default


def render_prompt(user: str, *, mode: str | None = None, system: str = "", fmt: ChatFormat = RELEASE_FORMAT) -> str:
  """The text the model continues. `mode` (slow / fast / auto) replaces any flag in `user` by its own suffix;
  None keeps the user's flags as written."""
  if mode is not None:
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
    user = split_mode(user)[0] + {"slow": "", "fast": " /no_think", "auto": " /auto_think"}[mode]
  system_turn = "" if fmt.system_open is None else f"{fmt.system_open}{system}{fmt.turn_end}"
  return f"{system_turn}{fmt.user_open}{user}{fmt.turn_end}{fmt.assistant_open}"


def render_response(reasoning: str, answer: str, *, mode: str, fmt: ChatFormat = RELEASE_FORMAT,
                    chosen: str | None = None) -> str:
  """The target reply: slow `<think>reasoning</think>answer<end>`, fast with an empty span; in auto mode the
  `chosen` mode's tag comes first."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if (mode == "auto") != (chosen is not None) or chosen not in (None, "slow", "fast"):
    raise ValueError(f"chosen must be 'slow' or 'fast' in auto mode and None otherwise, got mode={mode!r}, "
                     f"chosen={chosen!r}")
  effective = chosen or mode
  if effective == "slow" and not reasoning:
    raise ValueError("a slow reply needs a non-empty reasoning span")
  tag = "" if chosen is None else (fmt.auto_slow_tag if chosen == "slow" else fmt.auto_fast_tag)
  span = reasoning if effective == "slow" else ""
  return f"{tag}{fmt.think_open}{span}{fmt.think_close}{answer}{fmt.turn_end}"


def parse_response(text: str, fmt: ChatFormat = RELEASE_FORMAT) -> Response:
  """Splits a generated reply (everything after the prompt) into its parts. The answer is what follows the
  close marker up to the end marker; with no close marker the reply is incomplete and has no answer."""
  chosen = None
  for tag, mode in ((fmt.auto_fast_tag, "fast"), (fmt.auto_slow_tag, "slow")):
    if text.startswith(tag):
      chosen, text = mode, text[len(tag):]
      break
  ended = fmt.turn_end in text
  text = text.split(fmt.turn_end, 1)[0]
  if not text.startswith(fmt.think_open) or fmt.think_close not in text:
    return Response("slow", chosen, text.removeprefix(fmt.think_open), "", False)
  reasoning, _, answer = text[len(fmt.think_open):].partition(fmt.think_close)
  return Response("slow" if reasoning else "fast", chosen, reasoning, answer, ended)
