"""MoE expert residency: routing statistics, hot sets, locked pages, persisted statistics."""

from .residency import ExpertResidency, MoEConfig, lock_all, parse_hot_count

__all__ = ["ExpertResidency", "MoEConfig", "lock_all", "parse_hot_count"]
