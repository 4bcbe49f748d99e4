"""The pipeline's mode, Standby or Alarmed, kept in control byte 0 of the frames stream.

The transport gives every stream a few control bytes it carries without interpreting
(:meth:`frameshm.Writer.control` / :meth:`frameshm.Reader.set_control`). The pipeline
uses the first one: the controller writes the mode, the capture reads it to pick its
frame rate and the gateway shows it. Only :data:`MODE_ALARMED` raises the rate; any other
value (0 in a stream nobody steered yet, or a stranger's) reads as Standby.
"""

from __future__ import annotations

MODE_CONTROL = 0  # the control byte of the frames stream that holds the mode
MODE_STANDBY = 0
MODE_ALARMED = 1
MODE_NAMES = {MODE_STANDBY: "Standby", MODE_ALARMED: "Alarmed"}


def mode_of(value: int) -> int:
    """The mode a control byte value means: MODE_ALARMED, or MODE_STANDBY for anything else."""
    return MODE_ALARMED if value == MODE_ALARMED else MODE_STANDBY


def read_mode(stream) -> int:
    """The mode of a frames stream, through its Writer or any Reader of it."""
    return mode_of(stream.control(MODE_CONTROL))


def write_mode(stream, mode: int) -> None:
    """Sets the mode of a frames stream (a passive Reader is enough)."""
    stream.set_control(MODE_CONTROL, mode)
