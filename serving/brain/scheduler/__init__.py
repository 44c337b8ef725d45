"""Scheduling policies, chosen by name (see `make_policy`)."""

from .base import Decision, Policy, SchedulerState

__all__ = ["Decision", "Policy", "SchedulerState"]
