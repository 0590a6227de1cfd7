"""Where study.commands.console was before the engine/commands/papers layout: studies stored before it name
its classes and functions in their tuner.pkl, and a resume unpickles them from here. Nothing else imports this."""

from study.commands.console import *  # noqa: F401,F403
