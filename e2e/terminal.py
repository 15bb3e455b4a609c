"""What a terminal gives the job in its foreground, for tests that signal a command as a
terminal does (Ctrl-C, closing the window)."""

from __future__ import annotations

import signal

# The signals a terminal sends its foreground job: hang-up, Ctrl-C, Ctrl-\.
TERMINAL_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)


def as_from_a_terminal() -> None:
    """A `preexec_fn`: the terminal's signals at their default actions, as a shell starts its
    foreground jobs. A test run started in the background (`cmd &` from a script, nohup)
    ignores them, and everything it starts inherits that: a Ctrl-C the test sends would be
    lost (a build's `go` slept on through it) and the test would wait for what never ends."""
    for sig in TERMINAL_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
