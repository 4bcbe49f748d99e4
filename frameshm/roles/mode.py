"""The pipeline's mode, Standby or Alarmed, kept in control byte 0 of the frames stream,
and the controller's state beside it in control byte 1.

The transport gives every stream a few control bytes it carries without interpreting
(:meth:`frameshm.Writer.control` / :meth:`frameshm.Reader.set_control`). The pipeline
uses the first two:

* byte 0, the **mode**: the controller writes it, the capture reads it to pick its frame
  rate. Only :data:`MODE_ALARMED` raises the rate; any other value (0 in a stream nobody
  steered yet, or a stranger's) reads as Standby.
* byte 1, the controller's **state** (Standby / Validation / Tracking; 0 = no controller
  running), written just before the mode. It only informs: the gateway puts it in every
  frame header, so the page's badge shows what the controller decided for that very
  frame instead of a metrics document that may be half a second old. Nothing steers by it.
"""

from __future__ import annotations

from typing import Optional

MODE_CONTROL = 0  # the control byte of the frames stream that holds the mode
MODE_STANDBY = 0
MODE_ALARMED = 1
MODE_NAMES = {MODE_STANDBY: "Standby", MODE_ALARMED: "Alarmed"}

STATE_CONTROL = 1  # the control byte that holds the controller's state
STATE_NONE = 0     # no controller running (never steered, or it stopped)
STATE_CODES = {"Standby": 1, "Validation": 2, "Tracking": 3}
STATE_NAMES = {code: name for name, code in STATE_CODES.items()}


def mode_of(value: int) -> int:
    """The mode a control byte value means: MODE_ALARMED, or MODE_STANDBY for anything else."""
    return MODE_ALARMED if value == MODE_ALARMED else MODE_STANDBY


def read_mode(stream) -> int:
    """The mode of a frames stream, through its Writer or any Reader of it."""
    return mode_of(stream.control(MODE_CONTROL))


def write_mode(stream, mode: int) -> None:
    """Sets the mode of a frames stream (a passive Reader is enough)."""
    stream.set_control(MODE_CONTROL, mode)


def read_state(stream) -> Optional[str]:
    """The controller's state ("Standby", "Validation", "Tracking"), or None when no
    controller runs (or the byte holds a value that is not a state)."""
    return STATE_NAMES.get(stream.control(STATE_CONTROL))


def write_state(stream, state: Optional[str]) -> None:
    """Publishes the controller's state by name; None: no controller."""
    stream.set_control(STATE_CONTROL, STATE_NONE if state is None else STATE_CODES[state])
